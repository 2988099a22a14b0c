/* The failure the page recorded for a call (a fetch rejected before any request, a socket
   error), or ''. */
(a) => { const S = window[a.key]; const c = S && S[a.tag]; return String((c && c.error) || ''); }
