"""Ray Data stages of FlowSR: read -> crop -> degrade -> caption -> Parquet shards."""
