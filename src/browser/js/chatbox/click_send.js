/* Clicks the send control by script (when something covers it). Runs as the body of a function
   (see `chatbox::script`), with `KEY`, the helpers of helpers.js and the named constants bound;
   returns a JSON string. */
const st = window[KEY];
if (st && st.send) st.send.click();
return JSON.stringify(true);
