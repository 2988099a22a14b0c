-- Per-account concurrency across instances: a row per reply running on an account, in one of
-- its `per_account_concurrency` numbered slots. A slot is taken when free or expired,
-- renewed by its instance while the reply runs, and deleted when it ends; a crashed
-- instance's slots free themselves at `expires_at` (unix ms).
CREATE TABLE account_slots (
    account_id  TEXT NOT NULL,
    slot        INTEGER NOT NULL,       -- 0 .. the account's limit - 1
    owner       TEXT NOT NULL,          -- the instance's id
    holder      TEXT NOT NULL,          -- this hold's id: a release deletes only its own row
    expires_at  INTEGER NOT NULL,
    PRIMARY KEY (account_id, slot)
);
CREATE INDEX account_slots_owner ON account_slots(owner);
