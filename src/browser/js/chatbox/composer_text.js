/* The chat input's current text (null when it is gone). Runs as the body of a function (see
   `chatbox::script`), with `KEY`, the helpers of helpers.js and the named constants bound; returns
   a JSON string. */
const st = window[KEY];
if (!st || !st.input || !st.input.isConnected) return JSON.stringify(null);
const el = st.input;
return JSON.stringify(typeof el.value === 'string' ? el.value : el.innerText);
