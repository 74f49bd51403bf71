-- Destinations an operator paused (`POST /admin/v1/destinations/{name}/pause`). Their jobs keep
-- queueing; no process claims them until the row is deleted by a resume. A table rather than a
-- column on `destinations`, so a claim checks one tiny index and the common case (nothing
-- paused) costs nothing.
CREATE TABLE paused_destinations (
    destination_id int PRIMARY KEY REFERENCES destinations (id) ON DELETE CASCADE,
    paused_at      timestamptz NOT NULL DEFAULT now()
);
