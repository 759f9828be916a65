-- Projections: registry, checkpoints, per-stream positions and parked events.

-- One row per projection: the generation names its consumer group, and a
-- replay starts a new generation.
CREATE TABLE tidings_projections (
    name        TEXT PRIMARY KEY,
    generation  INTEGER     NOT NULL DEFAULT 1,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The next offset to apply, per topic partition, written in the same
-- transaction as the read model. The row lock taken while applying fences
-- out a stale instance: it finds the offset moved past its messages.
CREATE TABLE tidings_checkpoints (
    projection   TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    partition    INTEGER NOT NULL,
    next_offset  BIGINT  NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition)
);

-- The last sequence applied per stream: redelivered or republished events
-- (sequence <= last) are skipped, so each event changes a read model once.
CREATE TABLE tidings_projection_streams (
    projection      TEXT   NOT NULL,
    aggregate_type  TEXT   NOT NULL,
    aggregate_id    TEXT   NOT NULL,
    last_sequence   BIGINT NOT NULL,
    PRIMARY KEY (projection, aggregate_type, aggregate_id)
);

-- Events that were not applied: the poison event itself (dead-lettered) and
-- the later events of its stream, parked behind it until a re-drive.
CREATE TABLE tidings_parked (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projection      TEXT        NOT NULL,
    aggregate_type  TEXT        NOT NULL,
    aggregate_id    TEXT        NOT NULL,
    sequence        BIGINT,
    topic           TEXT        NOT NULL,
    partition       INTEGER     NOT NULL,
    "offset"        BIGINT      NOT NULL,
    dead_letter     BOOLEAN     NOT NULL,
    reason          TEXT        NOT NULL,
    message_key     TEXT,
    headers         JSONB       NOT NULL DEFAULT '{}'::jsonb,
    value           BYTEA,
    parked_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (projection, topic, partition, "offset")
);
CREATE INDEX tidings_parked_stream ON tidings_parked (projection, aggregate_type, aggregate_id, id);
