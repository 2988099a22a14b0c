/* Waits for a call started with `keep` to complete and forgets it: {status, headers, body}
   (the body base64) or {error}. */
async (a) => {
  const S = window[a.key] || {};
  const c = S[a.tag];
  if (!c) return JSON.stringify({ error: 'the call is gone from the page' });
  await c.finished;
  delete S[a.tag];
  if (c.error) return JSON.stringify({ error: c.error });
  let bin = '';
  for (const part of c.parts) for (let i = 0; i < part.length; i += 0x8000) bin += String.fromCharCode.apply(null, part.subarray(i, i + 0x8000));
  return JSON.stringify({ status: c.status, headers: c.headers, body: btoa(bin) });
}
