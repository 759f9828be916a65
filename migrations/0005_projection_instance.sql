-- An identity per projection per database, part of its consumer group id:
-- two databases running a projection of the same name on the same topics
-- (blue/green, another region, a rebuilt database) never share a group, so
-- neither resumes from the other's Kafka offsets.
ALTER TABLE tidings_projections
    ADD COLUMN instance UUID NOT NULL DEFAULT gen_random_uuid();
