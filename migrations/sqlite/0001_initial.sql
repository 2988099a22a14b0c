-- Every *_sealed column holds vault ciphertext bound to (table, column, row id).

CREATE TABLE accounts (
    id              TEXT PRIMARY KEY,
    service         TEXT NOT NULL,
    url             TEXT NOT NULL,
    email           TEXT,
    password_sealed BLOB,
    proxy_sealed    BLOB,                   -- a proxy URL may carry credentials
    enabled         INTEGER NOT NULL DEFAULT 1,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX accounts_service ON accounts(service);

CREATE TABLE sessions (
    id              TEXT PRIMARY KEY,
    account_id      TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    data_sealed     BLOB NOT NULL,          -- cookies, localStorage, sessionStorage, user agent
    source          TEXT NOT NULL,          -- imported | login
    authenticated   INTEGER NOT NULL DEFAULT 1,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER,
    last_used_at    INTEGER
);
CREATE INDEX sessions_account ON sessions(account_id, created_at);

CREATE TABLE chat_flows (
    id              TEXT PRIMARY KEY,
    service         TEXT NOT NULL,
    name            TEXT NOT NULL,
    version         INTEGER NOT NULL,
    active          INTEGER NOT NULL DEFAULT 1, -- older versions stay for comparison
    flow_json       TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX chat_flows_service ON chat_flows(service, name, active);

CREATE TABLE execution_events (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id      TEXT NOT NULL,
    service         TEXT NOT NULL,
    account_id      TEXT,
    flow_id         TEXT,
    tier            INTEGER,
    outcome         TEXT NOT NULL,          -- ok | error kind
    status          INTEGER,
    ttft_ms         INTEGER,
    latency_ms      INTEGER,
    detail          TEXT,
    created_at      INTEGER NOT NULL
);
CREATE INDEX execution_events_service ON execution_events(service, created_at);

CREATE TABLE fallback_decisions (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id      TEXT NOT NULL,
    service         TEXT NOT NULL,
    account_id      TEXT,
    failure         TEXT NOT NULL,
    action          TEXT NOT NULL,
    detail          TEXT,
    created_at      INTEGER NOT NULL
);

CREATE TABLE chat_history (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id      TEXT NOT NULL,
    service         TEXT NOT NULL,
    account_id      TEXT,
    prefix_hash     TEXT,
    site_conversation TEXT,
    prompt_tokens   INTEGER,
    completion_tokens INTEGER,
    created_at      INTEGER NOT NULL
);

CREATE TABLE service_metadata (
    service         TEXT PRIMARY KEY,
    login_pattern   TEXT,
    captcha         TEXT,
    rate_limit      TEXT,
    updated_at      INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id              TEXT PRIMARY KEY,
    key_hash        TEXT NOT NULL UNIQUE,   -- sha256 of the key; the key itself is shown once
    prefix          TEXT NOT NULL,          -- first characters, to recognise a key in listings
    admin           INTEGER NOT NULL DEFAULT 0,
    name            TEXT,
    created_at      INTEGER NOT NULL,
    revoked_at      INTEGER
);

-- Detects a master key that is not the one the database was sealed with.
CREATE TABLE vault_check (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    sealed          BLOB NOT NULL
);
