-- Events a projection skipped unread (a type its code does not know, or a
-- version newer than it knows when so configured), counted per type,
-- version and reason in the batch's transaction; shown by
-- `projections status` and the metrics.
CREATE TABLE tidings_projection_ignored (
    projection TEXT NOT NULL,
    event_type TEXT NOT NULL,
    event_version INT NOT NULL,
    reason TEXT NOT NULL,
    events BIGINT NOT NULL,
    first_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, event_type, event_version, reason)
);
