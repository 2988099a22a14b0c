-- How long a request waited for a slot on its account (the per-account concurrency limit).
ALTER TABLE execution_events ADD COLUMN queue_ms BIGINT;
