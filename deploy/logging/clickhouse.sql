-- The ClickHouse table that deploy/logging's Vector and Fluent Bit configs fill: one row per
-- record, the columns of a stats file's records (lmgate/records.py; docs/report.md).
-- A sidecar killed between writing records and its spool checkpoint writes them again at its
-- next start (at least once): ReplacingMergeTree keeps one row per request_id; count with FINAL
-- (SELECT count() FROM lmgate.records FINAL) or uniqExact(request_id).
CREATE DATABASE IF NOT EXISTS lmgate;

CREATE TABLE IF NOT EXISTS lmgate.records
(
    timestamp          DateTime64(3, 'UTC'),
    request_id         String,
    lmgate_id          Nullable(String),
    owner              Nullable(String),
    provider           LowCardinality(Nullable(String)),
    api_format         LowCardinality(Nullable(String)),
    method             LowCardinality(Nullable(String)),
    endpoint           Nullable(String),
    model              LowCardinality(Nullable(String)),
    stream             Nullable(Bool),
    status             Nullable(UInt16),
    input_tokens       Nullable(UInt64),
    output_tokens      Nullable(UInt64),
    cache_read_tokens  Nullable(UInt64),
    cache_write_tokens Nullable(UInt64),
    reasoning_tokens   Nullable(UInt64),
    total_tokens       Nullable(UInt64),
    duration_ms        Nullable(Float64),
    response_bytes     Nullable(UInt64),
    masked_key         Nullable(String),
    error_type         LowCardinality(Nullable(String)),
    folded_calls       Nullable(UInt64)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (toStartOfDay(timestamp), request_id);
