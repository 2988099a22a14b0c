-- Instances sharing one store: an account's browser work (login, learn, tiers 2 and 3) is
-- done by one instance at a time, the one holding the account's lease. A lease is taken when
-- absent, expired or already this instance's, renewed while held, and deleted when released;
-- a holder that stops renewing (a crash) loses it at `expires_at` (unix ms). No foreign key:
-- a lease outlives nothing, and an account removed meanwhile leaves a row that expires.
CREATE TABLE account_leases (
    account_id  TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,          -- the holding instance's id
    expires_at  INTEGER NOT NULL,
    taken_at    INTEGER NOT NULL
);
