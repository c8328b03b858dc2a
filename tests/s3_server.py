"""A local S3-compatible server for the object-store tests: moto's server mode on 127.0.0.1.

    python tests/s3_server.py PORT

One fix on top of moto 5.2: its CompleteMultipartUpload answer has the root element
`CompleteMultipartUploadResponse` where S3 (and the AWS SDK that pyarrow uses, which checks
for errors embedded in a 200 answer) has `CompleteMultipartUploadResult`, so pyarrow took every
multipart upload for a failed one. The answer is renamed here; nothing else is changed.
"""
from __future__ import annotations

import sys

WRONG_ROOT = b"CompleteMultipartUploadResponse"
S3_ROOT = b"CompleteMultipartUploadResult"


def fix_multipart_answer(app):
    """WSGI middleware: moto's multipart-complete answer with S3's root element."""

    def wrapped(environ, start_response):
        completing = environ.get("REQUEST_METHOD") == "POST" and "uploadId=" in environ.get("QUERY_STRING", "")
        if not completing:
            return app(environ, start_response)
        captured = {}

        def capture(status, headers, exc_info=None):
            captured["status"], captured["headers"] = status, headers
            return lambda data: None

        body = b"".join(app(environ, capture)).replace(WRONG_ROOT, S3_ROOT)
        headers = [(k, str(len(body)) if k.lower() == "content-length" else v) for k, v in captured["headers"]]
        start_response(captured["status"], headers)
        return [body]

    return wrapped


def main(port: int) -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import run_simple

    run_simple("127.0.0.1", port, fix_multipart_answer(DomainDispatcherApplication(create_backend_app)),
               threaded=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
