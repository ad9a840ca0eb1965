-- Multipart uploads whose abort could not be confirmed (S3 away when a run failed or was
-- taken over). The runner retries their abort until S3 confirms it, so none is left behind.
CREATE TABLE orphan_upload (
    upload_id  text PRIMARY KEY,
    key        text NOT NULL,
    since      timestamptz NOT NULL DEFAULT clock_timestamp()
);
