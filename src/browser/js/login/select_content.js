/* Called on an element: selects its content so that typing replaces it ("clear, then type"). */
function() {
  this.focus();
  if (typeof this.select === 'function') { this.select(); return; }
  if (this.isContentEditable) {
    const range = document.createRange();
    range.selectNodeContents(this);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }
}
