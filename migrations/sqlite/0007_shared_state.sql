-- Instances sharing one store tell each other what one of them saw: an account the site
-- rate-limited (until when), a flow's tier floor raised or lifted, a service whose flow was
-- re-learned. Each instance appends what it saw and reads the others' rows about once a
-- second (see shared.rs); rows older than an hour are pruned.
CREATE TABLE shared_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    origin      TEXT NOT NULL,          -- the instance that saw it
    kind        TEXT NOT NULL,          -- cooldown | floor_raised | floor_lifted | flow_changed
    subject     TEXT NOT NULL,          -- an account id, a flow id or a service
    value       INTEGER,                -- cooldown: until (unix ms); floor_raised: the tier
    created_at  INTEGER NOT NULL        -- unix ms
);
CREATE INDEX shared_events_created ON shared_events(created_at);

-- Bumped whenever a session's material is replaced in place (rotated cookies, what a page
-- wrote), so an instance holding an older copy can tell that it is not the one the site
-- rejected.
ALTER TABLE sessions ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
