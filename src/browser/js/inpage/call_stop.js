/* Stops a call when `stop` (aborts the fetch, closes the socket) and forgets it either way. */
(a) => { const S = window[a.key]; const c = S && S[a.tag]; if (c && c.stop && a.stop) c.stop(); if (S) delete S[a.tag]; return 'ok'; }
