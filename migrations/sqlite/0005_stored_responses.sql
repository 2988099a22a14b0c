-- Responses API: responses kept for `previous_response_id` and `GET /v1/responses/{id}`
-- (unless the request said `store: false`). The body (the response object and the
-- conversation up to it) is vault-sealed, bound to the row's id.
CREATE TABLE stored_responses (
    id          TEXT PRIMARY KEY,
    model       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    sealed      BLOB NOT NULL
);
