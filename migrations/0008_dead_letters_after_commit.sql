-- Dead letters are sent to the dead letter topic after the batch that
-- recorded them committed (tidings_parked is their outbox), so no batch
-- holds its locks while the broker answers. The message as received is
-- kept byte for byte (key, and headers in order with repeated keys) for the
-- copy; a copy the broker refuses for good records why instead.
ALTER TABLE tidings_parked
    ADD COLUMN raw_key     BYTEA,
    ADD COLUMN raw_headers BYTEA,
    ADD COLUMN dlq_sent_at TIMESTAMPTZ,
    ADD COLUMN dlq_error   TEXT;
-- Dead letters recorded before this version were sent in their batch.
UPDATE tidings_parked SET dlq_sent_at = parked_at WHERE dead_letter;
CREATE INDEX tidings_parked_unsent ON tidings_parked (projection, id)
    WHERE dead_letter AND dlq_sent_at IS NULL AND dlq_error IS NULL;
