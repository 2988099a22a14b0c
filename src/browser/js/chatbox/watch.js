/* Notes the elements present now and starts observing what is added or changed. Runs as the body
   of a function (see `chatbox::script`), with `KEY`, the helpers of helpers.js and the named
   constants bound; returns a JSON string. */
const st = window[KEY];
st.before = new WeakSet(document.querySelectorAll('*'));
st.touched = new Set();
st.obs = new MutationObserver((ms) => {
  for (const m of ms) {
    if (m.type === 'childList') {
      st.touched.add(m.target);
      m.addedNodes.forEach((n) => { if (n.nodeType === 1) st.touched.add(n); });
    } else if (m.target.parentElement) {
      st.touched.add(m.target.parentElement);
    }
  }
});
st.obs.observe(document.documentElement, { childList: true, subtree: true, characterData: true });
return JSON.stringify(true);
