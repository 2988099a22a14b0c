// The captcha handoff page: shows the live screenshot of a login waiting for a person,
// forwards clicks and typing into the site's page, and says how the login ended. The admin
// key comes from the admin page's session storage, `#key=…`, or is asked for.
"use strict";

const KEY = "computetower.admin_key";
const id = document.body.dataset.session;
const fromHash = new URLSearchParams(location.hash.slice(1)).get("key");
if (fromHash) {
  sessionStorage.setItem(KEY, fromHash);
  history.replaceState(null, "", location.pathname); // the key leaves the address bar
}
const $ = (x) => document.getElementById(x);
let asking = null;

function askKey() {
  if (asking) return asking;
  asking = new Promise((resolve) => {
    $("key-form").onsubmit = (e) => {
      e.preventDefault();
      const value = $("key-input").value.trim();
      if (!value) return;
      sessionStorage.setItem(KEY, value);
      $("key-input").value = "";
      $("key-dialog").close();
      asking = null;
      resolve();
    };
  });
  $("key-dialog").showModal();
  return asking;
}

async function call(method, path, body) {
  for (;;) {
    const headers = {};
    const key = sessionStorage.getItem(KEY);
    if (key) headers.authorization = "Bearer " + key;
    if (body !== undefined) headers["content-type"] = "application/json";
    const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    if (r.status === 401 || r.status === 403) {
      sessionStorage.removeItem(KEY);
      await askKey();
      continue;
    }
    return r;
  }
}

function done(title, text) {
  $("handoff-live").hidden = true;
  $("handoff-done").hidden = false;
  $("done-title").textContent = title;
  $("done-text").textContent = text;
  document.body.dataset.ended = "1";
}

let shown = null;
async function refresh() {
  const r = await call("GET", `/admin/sessions/${id}`);
  if (!r.ok) {
    done("No such session", "This browser session is unknown to this server (it may have restarted).");
    return;
  }
  const s = await r.json();
  if (s.state === "ended") {
    if (s.logged_in) done("Login done", `Account ${s.account_id} is logged in and its session is stored. You can close this page.`);
    else done("The login ended", `The login of account ${s.account_id} ended without a session (it failed or was cancelled); see the account's progress lines on the admin page.`);
    return;
  }
  $("handoff-state").textContent = s.state === "waiting_for_human"
    ? `Waiting for you: account ${s.account_id}, ${s.url}`
    : `Logging in: account ${s.account_id}, ${s.url}`;
  const shot = await call("GET", `/admin/sessions/${id}/screenshot`);
  if (shot.ok) {
    const url = URL.createObjectURL(await shot.blob());
    $("shot").src = url;
    if (shown) URL.revokeObjectURL(shown);
    shown = url;
  }
  setTimeout(() => refresh().catch(() => setTimeout(refresh, 2000)), 1000);
}

async function post(path, body) {
  await call("POST", `/admin/sessions/${id}/${path}`, body);
}

$("shot").addEventListener("click", (e) => {
  const shot = $("shot");
  const scale = shot.naturalWidth / shot.clientWidth;
  post("click", { x: e.offsetX * scale, y: e.offsetY * scale });
});
$("typing").addEventListener("submit", (e) => {
  e.preventDefault();
  post("type", { text: $("text").value });
  $("text").value = "";
});
$("enter").addEventListener("click", () => post("key", { key: "Enter" }));
$("tab").addEventListener("click", () => post("key", { key: "Tab" }));
refresh().catch(() => setTimeout(refresh, 2000));
