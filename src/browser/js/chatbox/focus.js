/* Focuses the chat input again. Runs as the body of a function (see `chatbox::script`), with
   `KEY`, the helpers of helpers.js and the named constants bound; returns a JSON string. */
const st = window[KEY];
if (st && st.input) st.input.focus();
return JSON.stringify(true);
