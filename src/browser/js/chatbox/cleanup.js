/* Stops observing and removes window[KEY]. Runs as the body of a function (see `chatbox::script`),
   with `KEY`, the helpers of helpers.js and the named constants bound; returns a JSON string. */
const st = window[KEY];
if (st && st.obs) st.obs.disconnect();
delete window[KEY];
return JSON.stringify(true);
