/* Types TEXT into the chat input by script (when Input.insertText did not land). Runs as the body
   of a function (see `chatbox::script`), with `KEY`, the helpers of helpers.js and the named
   constants bound; returns a JSON string. */
const st = window[KEY];
const el = st.input;
el.focus();
if (el.isContentEditable) {
  document.execCommand('selectAll', false);
  document.execCommand('insertText', false, TEXT);
} else {
  const proto = el.localName === 'textarea' ? HTMLTextAreaElement.prototype : HTMLInputElement.prototype;
  const setter = Object.getOwnPropertyDescriptor(proto, 'value').set;
  setter.call(el, TEXT);
  el.dispatchEvent(new Event('input', { bubbles: true }));
  el.dispatchEvent(new Event('change', { bubbles: true }));
}
return JSON.stringify(true);
