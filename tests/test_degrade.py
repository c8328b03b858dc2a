"""pipeline/degrade.py: shapes, determinism, the parameter distribution (issue 3, point 2),
closed-form kernels and the samplers. No Ray."""
import json
import math
from collections import Counter

import numpy as np
import pytest
from skimage import data

from pipeline import degrade as D

N_DRAWS = 20_000


@pytest.fixture(scope="module")
def hr():
    return np.ascontiguousarray(data.astronaut()[100:164, 180:244])  # uint8 64x64x3 RGB


@pytest.fixture(scope="module")
def draws():
    return [D.draw_params(D.sample_rng(0, f"sample-{i}")) for i in range(N_DRAWS)]


# ---------------------------------------------------------------------------------------------
# degrade(): shapes, dtypes, determinism, errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [4, 2])
def test_degrade_shapes_and_json_params(hr, scale):
    lr, params = D.degrade(hr, seed=3, sample_id="abc", scale=scale)
    assert lr.dtype == np.uint8 and lr.shape == (64 // scale, 64 // scale, 3)
    assert params["scale"] == scale and params["version"] == D.PARAMS_VERSION
    assert json.loads(json.dumps(params)) == params


def test_degrade_is_a_function_of_seed_and_sample_id(hr):
    lr, params = D.degrade(hr, seed=7, sample_id="x")
    lr_again, params_again = D.degrade(hr.copy(), seed=7, sample_id="x")
    assert np.array_equal(lr, lr_again) and params == params_again
    other_id, other_params = D.degrade(hr, seed=7, sample_id="y")
    _, other_seed = D.degrade(hr, seed=8, sample_id="x")
    assert params != other_params and params != other_seed
    # the recorded parameters alone reproduce the LR image, noise included
    assert np.array_equal(D.apply_degradation(hr, json.loads(json.dumps(params))), lr)


def test_bicubic_kind_is_antialiased_bicubic_and_recorded(hr):
    from PIL import Image

    lr, params = D.degrade(hr, seed=0, sample_id="b", kind="bicubic")
    assert params == {"version": D.PARAMS_VERSION, "kind": "bicubic", "scale": 4}
    assert np.array_equal(lr, np.asarray(Image.fromarray(hr).resize((16, 16), Image.BICUBIC)))
    assert np.array_equal(D.apply_degradation(hr, json.loads(json.dumps(params))), lr)
    # a smooth ramp stays a ramp: no shift, values within the HR range
    ramp = np.repeat(np.repeat(np.arange(64, dtype=np.uint8)[None, :, None] * 4, 64, 0), 3, 2)
    small = D.degrade(ramp, seed=0, sample_id="r", kind="bicubic")[0].astype(int)
    assert np.abs(small[:, 1:-1, 0] - (np.arange(1, 15) * 16 + 6)).max() <= 1
    with pytest.raises(ValueError, match="unknown degradation kind"):
        D.degrade(hr, seed=0, sample_id="b", kind="gaussian")


def test_degrade_does_not_touch_global_rng(hr):
    np.random.seed(0)
    expected = np.random.random()
    np.random.seed(0)
    D.degrade(hr, seed=0, sample_id="g")
    assert np.random.random() == expected


@pytest.mark.parametrize("bad, match", [
    (np.zeros((64, 64, 3), np.float32), "uint8"),
    (np.zeros((64, 64), np.uint8), "HxWx3"),
    (np.zeros((64, 64, 4), np.uint8), "HxWx3"),
    (np.zeros((62, 64, 3), np.uint8), "divisible"),
])
def test_degrade_rejects_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        D.degrade(bad, seed=0, sample_id="a")


def test_degrade_rejects_bad_arguments(hr):
    with pytest.raises(ValueError, match="seed"):
        D.degrade(hr, seed=-1, sample_id="a")
    with pytest.raises(ValueError, match="sample_id"):
        D.degrade(hr, seed=0, sample_id="")
    with pytest.raises(ValueError, match="scale"):
        D.degrade(hr, seed=0, sample_id="a", scale=0)
    with pytest.raises(ValueError, match="unknown kernel family"):
        D.make_kernel({"family": "box", "size": 7, "sigma_x": 1, "sigma_y": 1, "rotation": 0})
    with pytest.raises(ValueError, match="unknown resize mode"):
        D.resize(np.zeros((8, 8, 3), np.float32), 4, 4, "nearest")
    with pytest.raises(ValueError, match="unknown noise kind"):
        D.add_noise(np.zeros((8, 8, 3), np.float32), {"kind": "speckle", "noise_seed": 0})


def test_config_validation():
    with pytest.raises(ValueError, match="kernel_prob"):
        D.StageConfig(blur_sigma=(0.2, 3), resize_prob=(0.2, 0.7, 0.1), resize_range=(0.15, 1.5),
                      noise_range=(1, 30), poisson_scale_range=(0.05, 3), kernel_prob=(0.5,) * 6)
    with pytest.raises(ValueError, match="resize_range"):
        D.StageConfig(blur_sigma=(0.2, 3), resize_prob=(0.2, 0.7, 0.1), resize_range=(1.2, 1.5),
                      noise_range=(1, 30), poisson_scale_range=(0.05, 3))
    with pytest.raises(ValueError, match="kernel_sizes"):
        D.DegradationConfig(kernel_sizes=(7, 8))
    with pytest.raises(ValueError, match="unknown resize mode"):
        D.DegradationConfig(resize_modes=("area", "lanczos"))


def test_config_holds_realesrgan_numbers():
    cfg = D.REALESRGAN_X4
    assert cfg.stage1.kernel_list == ("iso", "aniso", "generalized_iso", "generalized_aniso",
                                      "plateau_iso", "plateau_aniso")
    assert cfg.stage1.kernel_prob == cfg.stage2.kernel_prob == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert cfg.kernel_sizes == (7, 9, 11, 13, 15, 17, 19, 21)
    assert (cfg.stage1.blur_sigma, cfg.stage2.blur_sigma) == ((0.2, 3.0), (0.2, 1.5))
    assert cfg.stage1.betag_range == (0.5, 4.0) and cfg.stage1.betap_range == (1.0, 2.0)
    assert (cfg.stage1.resize_prob, cfg.stage1.resize_range) == ((0.2, 0.7, 0.1), (0.15, 1.5))
    assert (cfg.stage2.resize_prob, cfg.stage2.resize_range) == ((0.3, 0.4, 0.3), (0.3, 1.2))
    assert (cfg.stage1.noise_range, cfg.stage2.noise_range) == ((1.0, 30.0), (1.0, 25.0))
    assert cfg.stage1.poisson_scale_range == (0.05, 3.0)
    assert cfg.stage2.poisson_scale_range == (0.05, 2.5)
    assert cfg.stage1.gray_noise_prob == cfg.stage2.gray_noise_prob == 0.4
    assert cfg.stage1.jpeg_range == cfg.stage2.jpeg_range == (30.0, 95.0)
    assert (cfg.second_blur_prob, cfg.final_sinc_prob, cfg.stage1.sinc_prob) == (0.8, 0.8, 0.1)


# ---------------------------------------------------------------------------------------------
# The parameter distribution over 20,000 draws (issue 3, acceptance 2)
# ---------------------------------------------------------------------------------------------

def assert_frequency(count: int, n: int, p: float, what: str):
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= 3 * sigma + 1e-9, f"{what}: {count}/{n}, expected p={p}"


def check_categorical(values, probs: dict, what: str):
    counts, n = Counter(values), len(values)
    assert set(counts) <= set(probs), f"{what}: unexpected {set(counts) - set(probs)}"
    for name, p in probs.items():
        assert_frequency(counts[name], n, p, f"{what} {name}")


def in_range(value, bounds):
    return bounds[0] <= value <= bounds[1]


def check_kernel_ranges(kernel, stage, cfg):
    assert kernel["size"] in cfg.kernel_sizes
    if kernel["family"] == D.SINC:
        omega = cfg.sinc_omega_small if kernel["size"] < cfg.sinc_large_from else cfg.sinc_omega_large
        assert in_range(kernel["omega_c"], omega)
        return
    assert in_range(kernel["sigma_x"], stage.blur_sigma) and in_range(kernel["sigma_y"], stage.blur_sigma)
    assert in_range(kernel["rotation"], cfg.rotation_range)
    if kernel["family"].endswith("_iso") or kernel["family"] == "iso":
        assert kernel["sigma_y"] == kernel["sigma_x"] and kernel["rotation"] == 0.0
    if kernel["family"].startswith("generalized"):
        assert in_range(kernel["beta"], stage.betag_range)
    elif kernel["family"].startswith("plateau"):
        assert in_range(kernel["beta"], stage.betap_range)
    else:
        assert "beta" not in kernel


def test_distribution_frequencies(draws):
    cfg = D.REALESRGAN_X4
    for name, stage in (("stage1", cfg.stage1), ("stage2", cfg.stage2)):
        kernels = [d[name]["blur"] for d in draws if d[name]["blur"] is not None]
        family_probs = {f: (1 - stage.sinc_prob) * p for f, p in zip(stage.kernel_list, stage.kernel_prob)}
        check_categorical([k["family"] for k in kernels], {**family_probs, D.SINC: stage.sinc_prob},
                          f"{name} kernel family")
        check_categorical([k["size"] for k in kernels], {s: 1 / 8 for s in cfg.kernel_sizes},
                          f"{name} kernel size")
        # beta: [low, 1) or [1, high] with p 0.5 each; plateau's low is 1, so half are exactly 1
        below = [k["beta"] < 1 for k in kernels if k["family"].startswith("generalized")]
        check_categorical(below, {True: 0.5, False: 0.5}, f"{name} generalized beta < 1")
        ones = [k["beta"] == 1.0 for k in kernels if k["family"].startswith("plateau")]
        check_categorical(ones, {True: 0.5, False: 0.5}, f"{name} plateau beta == 1")
        check_categorical([d[name]["resize"]["direction"] for d in draws],
                          dict(zip(D.RESIZE_DIRECTIONS, stage.resize_prob)), f"{name} resize")
        check_categorical([d[name]["resize"]["mode"] for d in draws],
                          {m: 1 / 3 for m in D.RESIZE_MODES}, f"{name} resize mode")
        check_categorical([d[name]["noise"]["kind"] for d in draws],
                          dict(zip(D.NOISE_KINDS, (stage.gaussian_noise_prob,
                                                   1 - stage.gaussian_noise_prob))), f"{name} noise")
        check_categorical([d[name]["noise"]["gray"] for d in draws],
                          {True: stage.gray_noise_prob, False: 1 - stage.gray_noise_prob},
                          f"{name} gray noise")
    check_categorical([d["stage2"]["blur"] is not None for d in draws],
                      {True: cfg.second_blur_prob, False: 1 - cfg.second_blur_prob}, "second blur")
    check_categorical([d["final"]["sinc"] is not None for d in draws],
                      {True: cfg.final_sinc_prob, False: 1 - cfg.final_sinc_prob}, "final sinc")
    check_categorical([d["final"]["order"] for d in draws],
                      {D.FINAL_ORDERS[0]: 0.5, D.FINAL_ORDERS[1]: 0.5}, "final order")
    check_categorical([d["final"]["resize_mode"] for d in draws],
                      {m: 1 / 3 for m in D.RESIZE_MODES}, "final resize mode")


def test_distribution_ranges(draws):
    cfg = D.REALESRGAN_X4
    for d in draws:
        for name, stage in (("stage1", cfg.stage1), ("stage2", cfg.stage2)):
            if d[name]["blur"] is not None:
                check_kernel_ranges(d[name]["blur"], stage, cfg)
            resize = d[name]["resize"]
            bounds = {"up": (1.0, stage.resize_range[1]), "down": (stage.resize_range[0], 1.0),
                      "keep": (1.0, 1.0)}[resize["direction"]]
            assert in_range(resize["factor"], bounds)
            noise = d[name]["noise"]
            if noise["kind"] == "gaussian":
                assert in_range(noise["sigma"], stage.noise_range)
            else:
                assert in_range(noise["scale"], stage.poisson_scale_range)
            assert 0 <= noise["noise_seed"] < 2**63
        assert in_range(d["stage1"]["jpeg_quality"], cfg.stage1.jpeg_range)
        assert in_range(d["final"]["jpeg_quality"], cfg.stage2.jpeg_range)
        sinc = d["final"]["sinc"]
        if sinc is not None:
            assert sinc["family"] == D.SINC and sinc["size"] in cfg.kernel_sizes
            assert in_range(sinc["omega_c"], cfg.final_sinc_omega)


# ---------------------------------------------------------------------------------------------
# Kernels and operators: closed forms
# ---------------------------------------------------------------------------------------------

def gaussian_1d(size, sigma):
    ax = np.arange(size) - size // 2
    g = np.exp(-0.5 * ax**2 / sigma**2)
    return g / g.sum()


def test_iso_kernel_is_outer_product_of_1d_gaussians():
    k = D.make_kernel({"family": "iso", "size": 13, "sigma_x": 1.7, "sigma_y": 1.7, "rotation": 0.0})
    assert np.allclose(k, np.outer(gaussian_1d(13, 1.7), gaussian_1d(13, 1.7)), atol=1e-12)


def test_aniso_kernel_rotation_swaps_axes():
    base = {"family": "aniso", "size": 15, "sigma_x": 3.0, "sigma_y": 1.0}
    k0 = D.make_kernel({**base, "rotation": 0.0})
    k90 = D.make_kernel({**base, "rotation": math.pi / 2})
    assert np.allclose(k0, np.outer(gaussian_1d(15, 1.0), gaussian_1d(15, 3.0)), atol=1e-12)
    assert np.allclose(k90, k0.T, atol=1e-12)


def test_generalized_and_plateau_kernels():
    base = {"size": 11, "sigma_x": 2.0, "sigma_y": 1.2, "rotation": 0.4}
    gauss = D.make_kernel({**base, "family": "aniso"})
    assert np.allclose(D.make_kernel({**base, "family": "generalized_aniso", "beta": 1.0}), gauss)
    plateau = D.make_kernel({**base, "family": "plateau_aniso", "beta": 1.5})
    q = D._quadratic_form(11, D._inverse_covariance(2.0, 1.2, 0.4))
    expected = 1 / (q**1.5 + 1)
    assert np.allclose(plateau, expected / expected.sum())
    for k in (gauss, plateau):
        assert math.isclose(k.sum(), 1.0) and np.allclose(k, k[::-1, ::-1])  # point symmetric


def test_sinc_kernel():
    k = D.sinc_kernel(math.pi / 2, 9)
    assert math.isclose(k.sum(), 1.0) and np.allclose(k, k.T) and np.allclose(k, k[::-1])
    assert k[4, 4] == k.max()


def load_basicsr_degradations():
    """basicsr/data/degradations.py alone (the package __init__ imports every model)."""
    import importlib.util
    import sys

    spec = importlib.util.find_spec("basicsr")
    assert spec is not None, "BasicSR 1.4.2 is the reference here: ./run installs it (pip install --no-deps basicsr==1.4.2)"
    import torchvision.transforms.functional as F

    sys.modules.setdefault("torchvision.transforms.functional_tensor", F)
    path = spec.submodule_search_locations[0] + "/data/degradations.py"
    module_spec = importlib.util.spec_from_file_location("basicsr_degradations", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_kernels_match_basicsr():
    bd = load_basicsr_degradations()
    for family, fn in (("aniso", lambda: bd.bivariate_Gaussian(13, 2.0, 0.7, 0.3, isotropic=False)),
                       ("generalized_aniso",
                        lambda: bd.bivariate_generalized_Gaussian(13, 2.0, 0.7, 0.3, 0.6, isotropic=False)),
                       ("plateau_aniso", lambda: bd.bivariate_plateau(13, 2.0, 0.7, 0.3, 1.4, isotropic=False))):
        params = {"family": family, "size": 13, "sigma_x": 2.0, "sigma_y": 0.7, "rotation": 0.3,
                  "beta": 0.6 if family.startswith("generalized") else 1.4}
        assert np.allclose(D.make_kernel(params), fn(), atol=1e-12), family
    assert np.allclose(D.sinc_kernel(1.3, 15), bd.circular_lowpass_kernel(1.3, 15), atol=1e-12)


def test_separable_blur_equals_2d_blur():
    img = np.random.default_rng(0).random((40, 50, 3), dtype=np.float32)
    k = D.make_kernel({"family": "iso", "size": 21, "sigma_x": 2.5, "sigma_y": 2.5, "rotation": 0.0})
    import cv2

    direct = cv2.filter2D(img, -1, k.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)
    assert np.allclose(D.blur(img, k), direct, atol=1e-5)


def test_standard_normal_moments():
    z = D.standard_normal(200_001, np.random.default_rng(1))
    assert z.shape == (200_001,) and z.dtype == np.float32
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01


@pytest.mark.parametrize("level, vals", [(0, 256.0), (3, 4.0), (77, 256.0), (255, 128.0)])
def test_poisson_counts_moments(level, vals):
    n = 100_000
    counts = D.poisson_counts(np.full((n,), level, np.uint8), vals, np.random.default_rng(level))
    lam = level / 255 * vals
    assert counts.dtype == np.int32 and counts.min() >= 0
    if lam == 0:
        assert not counts.any()
        return
    assert abs(counts.mean() - lam) < 5 * math.sqrt(lam / n)
    assert abs(counts.var() / lam - 1) < 0.03


def test_poisson_counts_match_pmf():
    from scipy import stats

    counts = D.poisson_counts(np.full((200_000,), 200, np.uint8), 64.0, np.random.default_rng(5))
    lam = 200 / 255 * 64
    ks, observed = np.unique(counts, return_counts=True)
    expected = stats.poisson.pmf(ks, lam) * counts.size
    keep = expected > 20
    chi2 = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    assert chi2 < stats.chi2.ppf(0.999, keep.sum() - 1)


def test_gray_noise_is_equal_across_channels():
    img = np.full((16, 16, 3), 0.5, np.float32)
    for noise in ({"kind": "gaussian", "sigma": 20.0, "gray": True, "noise_seed": 1},
                  {"kind": "poisson", "scale": 2.0, "gray": True, "noise_seed": 2}):
        out = D.add_noise(img, noise)
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
        assert out.min() >= 0 and out.max() <= 1 and not np.array_equal(out, img)


def test_jpeg_round_trip_keeps_shape_and_range():
    img = np.random.default_rng(2).random((24, 40, 3), dtype=np.float32)
    out = D.jpeg(img, 30.4)
    assert out.shape == img.shape and out.dtype == np.float32 and 0 <= out.min() <= out.max() <= 1
    assert np.abs(out - img).mean() > 0.01
