// Demo Chat front end: vanilla JS, no build step.
// On send: create a conversation (first message of the page), then call the chat endpoint of
// the site's wire shape and render the streamed reply as it arrives. The claude shape looks up
// the organization first (once per page load); the ws shape chats over a WebSocket; the
// signed shape signs each chat call with a key its inline script hides (every shape does when
// the site says so). The newchat shape sends the first message in its create call; batch and
// details create the conversation with the first message and name the previous reply in the
// next; details and think mark reasoning up inside the text; think fetches its token when the
// page loads; fragile's page takes over its form only on a second load. When the site's
// anti-bot check is on, every API call carries the page's clearance token (cookie and header).
// When the site takes uploads (<meta name="demo-uploads">), files chosen with the attach
// control are uploaded at once and the next chat call names them.
(function () {
  "use strict";

  var SHAPE = meta("demo-shape") || "openai";
  var TOKEN_KEY = "demo_token";
  // The think shape keeps its token wrapped under another key, written when this page loads.
  var WRAPPED_TOKEN_KEY = "userToken";
  // Every chat call is signed when the site says so (the signed shape always is).
  var SIGNED = SHAPE === "signed" || meta("demo-signed") !== null;
  // A test control: the page shows more than the reply it was sent.
  var RENDER_SUFFIX = meta("demo-render-suffix");
  // How attached files are uploaded: "multipart", "slot", or null (no attach control).
  var UPLOADS = meta("demo-uploads");

  var messagesEl = document.getElementById("messages");
  var form = document.getElementById("composer");
  var input = document.getElementById("prompt");
  var sendButton = document.getElementById("send");

  // A session opened without login (sites that need none) comes with its token in the page.
  var bootstrap = document.getElementById("session-bootstrap");
  if (bootstrap) {
    try {
      var boot = JSON.parse(bootstrap.textContent);
      if (boot.token) localStorage.setItem(TOKEN_KEY, boot.token);
    } catch (e) {}
  }

  var conversationId = null;
  var history = []; // openai shape: the full history is resent each turn
  var parentMessageId = null; // patch, batch, details, think: id of the last reply
  var turnCount = 0; // details: the turns of the conversation so far
  var orgId = null; // claude shape: kept after the first lookup
  var socket = null; // ws shape: the open socket of the conversation

  function meta(name) {
    var el = document.querySelector('meta[name="' + name + '"]');
    return el ? el.getAttribute("content") : null;
  }

  function uuid() {
    if (window.crypto && typeof window.crypto.randomUUID === "function") {
      return window.crypto.randomUUID();
    }
    var b = new Uint8Array(16);
    window.crypto.getRandomValues(b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    var h = Array.prototype.map.call(b, function (x) {
      return (x + 0x100).toString(16).slice(1);
    }).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" +
      h.slice(16, 20) + "-" + h.slice(20);
  }

  function authToken() {
    if (SHAPE === "think") {
      try {
        return JSON.parse(localStorage.getItem(WRAPPED_TOKEN_KEY) || "{}").value || "";
      } catch (e) {
        return "";
      }
    }
    return localStorage.getItem(TOKEN_KEY) || "";
  }

  function apiHeaders(contentType) {
    return withClearance({
      "content-type": contentType || "application/json",
      "authorization": "Bearer " + authToken(),
      "x-csrf-token": meta("csrf-token") || ""
    });
  }

  // The API's auth headers alone (a FormData body sets its own content type).
  function authHeaders() {
    return withClearance({
      "authorization": "Bearer " + authToken(),
      "x-csrf-token": meta("csrf-token") || ""
    });
  }

  function getHeaders() {
    return withClearance({
      "accept": "application/json",
      "authorization": "Bearer " + authToken(),
      "x-csrf-token": meta("csrf-token") || ""
    });
  }

  // The think shape's page fetches its token with the session cookie when it loads and keeps
  // it in localStorage, wrapped the way its storage library does; sending waits for it.
  var pageReady = Promise.resolve();
  if (SHAPE === "think") {
    pageReady = fetch("/api/v1/auths/", { credentials: "same-origin" }).then(async function (r) {
      if (!r.ok) return;
      var j = await r.json();
      localStorage.setItem(WRAPPED_TOKEN_KEY, JSON.stringify({ value: j.token, __version: "0" }));
    }).catch(function () { /* the chat call will say what is wrong */ });
  }

  // ---------------------------------------------------------------- anti-bot clearance

  // With the anti-bot check on, the page carries <meta name="demo-clearance-ttl">. The page
  // then makes up a token, stores it in the demo_clearance cookie, registers it with
  // POST /api/clearance, and sends it in x-demo-clearance with every API call (in the URL for
  // the WebSocket, which takes no headers). A token lasts
  // the meta's seconds, so a fresh one is registered after half of that.
  var CLEARANCE_COOKIE = "demo_clearance";
  var clearanceTtlMeta = meta("demo-clearance-ttl");
  var clearanceOn = clearanceTtlMeta !== null;
  var clearanceToken = null;
  var clearanceRenewAt = 0;
  var clearancePending = null;
  var clearanceTimer = null;
  window.__demoClearance = null;

  function randomHex(n) {
    var b = new Uint8Array(n);
    window.crypto.getRandomValues(b);
    return toHex(b);
  }

  function withClearance(headers) {
    if (clearanceToken) headers["x-demo-clearance"] = clearanceToken;
    return headers;
  }

  function registerClearance() {
    var token = randomHex(16);
    document.cookie = CLEARANCE_COOKIE + "=" + token + "; Path=/; SameSite=Lax";
    clearanceToken = token;
    window.__demoClearance = token;
    var pending = fetch("/api/clearance", {
      method: "POST",
      credentials: "same-origin",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ token: token })
    }).then(async function (r) {
      if (!r.ok) throw await failure(r);
      var j = await r.json();
      var ttl = typeof j.expires_in === "number" ? j.expires_in : Number(clearanceTtlMeta || 0);
      var renewIn = Math.max(1000, ttl * 500);
      clearanceRenewAt = Date.now() + renewIn;
      if (clearanceTimer) clearTimeout(clearanceTimer);
      clearanceTimer = setTimeout(function () {
        registerClearance().catch(function () { /* the next call tries again */ });
      }, renewIn);
      return token;
    }).finally(function () {
      if (clearancePending === pending) clearancePending = null;
    });
    clearancePending = pending;
    return pending;
  }

  // Resolves once the page holds a live clearance token (at once when the check is off).
  function ensureClearance() {
    if (!clearanceOn) return Promise.resolve(null);
    if (clearancePending) return clearancePending;
    if (clearanceToken && Date.now() < clearanceRenewAt) return Promise.resolve(clearanceToken);
    return registerClearance();
  }

  if (clearanceOn) registerClearance().catch(function () { /* the first call tries again */ });

  // ---------------------------------------------------------------- signing (signed shape)

  function toHex(bytes) {
    return Array.prototype.map.call(bytes, function (x) {
      return (x + 0x100).toString(16).slice(1);
    }).join("");
  }

  // SHA-256 in plain JS, for pages opened outside a secure context (no crypto.subtle).
  function sha256Fallback(bytes) {
    var K = [];
    var H = [];
    function frac(x) { return ((x - Math.floor(x)) * 0x100000000) | 0; }
    for (var n = 2, found = 0; found < 64; n++) {
      var prime = true;
      for (var d = 2; d * d <= n; d++) if (n % d === 0) { prime = false; break; }
      if (!prime) continue;
      if (found < 8) H[found] = frac(Math.pow(n, 1 / 2));
      K[found++] = frac(Math.pow(n, 1 / 3));
    }
    var len = bytes.length;
    var total = ((len + 9 + 63) >> 6) << 6;
    var m = new Uint8Array(total);
    m.set(bytes);
    m[len] = 0x80;
    var bits = len * 8;
    for (var i = 0; i < 8; i++) m[total - 1 - i] = (bits / Math.pow(2, 8 * i)) & 0xff;
    var w = new Array(64);
    for (var off = 0; off < total; off += 64) {
      for (i = 0; i < 16; i++) {
        w[i] = (m[off + 4 * i] << 24) | (m[off + 4 * i + 1] << 16) |
          (m[off + 4 * i + 2] << 8) | m[off + 4 * i + 3];
      }
      for (i = 16; i < 64; i++) {
        var a15 = w[i - 15];
        var a2 = w[i - 2];
        var s0 = ((a15 >>> 7) | (a15 << 25)) ^ ((a15 >>> 18) | (a15 << 14)) ^ (a15 >>> 3);
        var s1 = ((a2 >>> 17) | (a2 << 15)) ^ ((a2 >>> 19) | (a2 << 13)) ^ (a2 >>> 10);
        w[i] = (w[i - 16] + s0 + w[i - 7] + s1) | 0;
      }
      var h = H.slice();
      for (i = 0; i < 64; i++) {
        var e = h[4];
        var a = h[0];
        var S1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
        var ch = (e & h[5]) ^ (~e & h[6]);
        var t1 = (h[7] + S1 + ch + K[i] + w[i]) | 0;
        var S0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
        var maj = (a & h[1]) ^ (a & h[2]) ^ (h[1] & h[2]);
        var t2 = (S0 + maj) | 0;
        h = [(t1 + t2) | 0, a, h[1], h[2], (h[3] + t1) | 0, e, h[5], h[6]];
      }
      for (i = 0; i < 8; i++) H[i] = (H[i] + h[i]) | 0;
    }
    var out = new Uint8Array(32);
    for (i = 0; i < 8; i++) {
      out[4 * i] = H[i] >>> 24;
      out[4 * i + 1] = (H[i] >>> 16) & 0xff;
      out[4 * i + 2] = (H[i] >>> 8) & 0xff;
      out[4 * i + 3] = H[i] & 0xff;
    }
    return out;
  }

  async function sha256Hex(text) {
    var bytes = new TextEncoder().encode(text);
    if (window.crypto && window.crypto.subtle) {
      return toHex(new Uint8Array(await window.crypto.subtle.digest("SHA-256", bytes)));
    }
    return toHex(sha256Fallback(bytes));
  }

  // x-signature = hex SHA-256 of KEY "\n" TIMESTAMP "\n" BODY; the key comes from the
  // page's inline script.
  async function signRequest(req, headers) {
    var key = typeof window.__demoRt === "function" ? window.__demoRt() : "";
    var ts = String(Date.now());
    headers["x-timestamp"] = ts;
    headers["x-signature"] = await sha256Hex(key + "\n" + ts + "\n" + req.body);
  }

  // ---------------------------------------------------------------- rendering

  function escapeHtml(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;");
  }

  function inline(s) {
    return escapeHtml(s)
      .replace(/`([^`]+)`/g, "<code>$1</code>")
      .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>");
  }

  function renderMarkdown(text) {
    var html = "";
    var para = [];
    var inList = false;
    function flushPara() {
      if (para.length) {
        html += "<p>" + para.map(inline).join("<br>") + "</p>";
        para = [];
      }
    }
    function closeList() {
      if (inList) {
        html += "</ul>";
        inList = false;
      }
    }
    text.split("\n").forEach(function (line) {
      var item = /^\s*[-*]\s+(.*)$/.exec(line);
      if (item) {
        flushPara();
        if (!inList) {
          html += "<ul>";
          inList = true;
        }
        html += "<li>" + inline(item[1]) + "</li>";
      } else if (line.trim() === "") {
        flushPara();
        closeList();
      } else {
        closeList();
        para.push(line);
      }
    });
    flushPara();
    closeList();
    return html;
  }

  function scrollDown() {
    messagesEl.scrollTop = messagesEl.scrollHeight;
  }

  function addUserMessage(text) {
    var el = document.createElement("div");
    el.className = "msg user";
    el.textContent = text;
    messagesEl.appendChild(el);
    scrollDown();
  }

  // An assistant message whose view is updated as the reply streams in.
  function AssistantMessage() {
    this.el = document.createElement("div");
    this.el.className = "msg assistant";
    this.el.setAttribute("data-status", "streaming");
    this.details = null;
    this.reasoningEl = null;
    this.answerEl = document.createElement("div");
    this.answerEl.className = "answer";
    this.el.appendChild(this.answerEl);
    messagesEl.appendChild(this.el);
    this.reasoning = "";
    this.answer = "";
    scrollDown();
  }

  AssistantMessage.prototype.render = function () {
    if (this.reasoning && !this.details) {
      this.details = document.createElement("details");
      this.details.className = "reasoning";
      this.details.open = true;
      var summary = document.createElement("summary");
      summary.textContent = "Thinking…";
      this.details.appendChild(summary);
      this.reasoningEl = document.createElement("div");
      this.reasoningEl.className = "reasoning-text";
      this.details.appendChild(this.reasoningEl);
      this.el.insertBefore(this.details, this.answerEl);
    }
    if (this.reasoningEl) {
      this.reasoningEl.textContent = this.reasoning;
      if (this.answer) {
        this.details.querySelector("summary").textContent = "Thought";
      }
    }
    this.answerEl.innerHTML = renderMarkdown(this.answer) +
      (RENDER_SUFFIX && this.answer ? "<p>" + escapeHtml(RENDER_SUFFIX) + "</p>" : "");
    scrollDown();
  };

  AssistantMessage.prototype.addReasoning = function (t) {
    this.reasoning += t;
    this.render();
  };
  AssistantMessage.prototype.addAnswer = function (t) {
    this.answer += t;
    this.render();
  };
  AssistantMessage.prototype.finish = function () {
    this.el.setAttribute("data-status", "done");
    if (this.details) {
      this.details.open = false;
      this.details.querySelector("summary").textContent = "Thought";
    }
    this.render();
  };
  AssistantMessage.prototype.fail = function (message) {
    this.el.setAttribute("data-status", "error");
    this.el.classList.add("error");
    var p = document.createElement("p");
    p.className = "error";
    p.setAttribute("role", "alert");
    p.textContent = message;
    this.el.appendChild(p);
    scrollDown();
  };

  // ---------------------------------------------------------------- stream readers

  async function readChunks(response, onBytes) {
    var reader = response.body.getReader();
    for (;;) {
      var step = await reader.read();
      if (step.done) return;
      onBytes(step.value);
    }
  }

  // text/event-stream: calls onEvent(name, data) per event.
  async function readSse(response, onEvent) {
    var decoder = new TextDecoder();
    var buffer = "";
    function dispatch(block) {
      var name = null;
      var data = [];
      block.split(/\r?\n/).forEach(function (line) {
        if (line.indexOf("event:") === 0) name = line.slice(6).trim();
        else if (line.indexOf("data:") === 0) data.push(line.slice(5).replace(/^ /, ""));
      });
      if (data.length) onEvent(name, data.join("\n"));
    }
    await readChunks(response, function (bytes) {
      buffer += decoder.decode(bytes, { stream: true });
      var m;
      while ((m = /\r?\n\r?\n/.exec(buffer))) {
        dispatch(buffer.slice(0, m.index));
        buffer = buffer.slice(m.index + m[0].length);
      }
    });
    buffer += decoder.decode();
    if (buffer.trim()) dispatch(buffer);
  }

  // One callback per non-empty text line.
  async function readLines(response, onLine) {
    var decoder = new TextDecoder();
    var buffer = "";
    await readChunks(response, function (bytes) {
      buffer += decoder.decode(bytes, { stream: true });
      var i;
      while ((i = buffer.indexOf("\n")) >= 0) {
        var line = buffer.slice(0, i).replace(/\r$/, "");
        buffer = buffer.slice(i + 1);
        if (line) onLine(line);
      }
    });
    buffer += decoder.decode();
    if (buffer.trim()) onLine(buffer.trim());
  }

  // Length-prefixed frames: flag byte, big-endian u32 length, JSON.
  async function readFrames(response, onFrame) {
    var buffer = new Uint8Array(0);
    var decoder = new TextDecoder();
    await readChunks(response, function (bytes) {
      var joined = new Uint8Array(buffer.length + bytes.length);
      joined.set(buffer, 0);
      joined.set(bytes, buffer.length);
      buffer = joined;
      while (buffer.length >= 5) {
        var view = new DataView(buffer.buffer, buffer.byteOffset, buffer.byteLength);
        var len = view.getUint32(1, false);
        if (buffer.length < 5 + len) break;
        var flag = buffer[0];
        var payload = JSON.parse(decoder.decode(buffer.subarray(5, 5 + len)));
        buffer = buffer.slice(5 + len);
        onFrame(flag, payload);
      }
    });
  }

  // Reasoning marked up inside the text (details and think shapes): the whole text so far →
  // the reasoning (its <summary> heading and `> ` quote marks left out) and the answer (its
  // <answer> tags left out). A tag still arriving at the end is not shown.
  function splitMarkup(text) {
    var open = /<details type="reasoning"[^>]*>|<think>/.exec(text);
    var reasoning = "";
    var answer = text;
    if (open) {
      var closeTag = open[0].indexOf("<think") === 0 ? "</think>" : "</details>";
      var inner = text.slice(open.index + open[0].length);
      var end = inner.indexOf(closeTag);
      reasoning = end < 0 ? inner : inner.slice(0, end);
      answer = text.slice(0, open.index) + (end < 0 ? "" : inner.slice(end + closeTag.length));
      reasoning = reasoning.replace(/<summary>[\s\S]*?(<\/summary>|$)/, "")
        .split("\n").map(function (line) { return line.replace(/^\s*> ?/, ""); }).join("\n");
    }
    answer = answer.replace(/<\/?answer>/g, "").replace(/<[^>]*$/, "");
    return { reasoning: reasoning.replace(/<[^>]*$/, "").trim(), answer: answer.trim() };
  }

  // ---------------------------------------------------------------- the shapes

  function createConversationRequest() {
    if (SHAPE === "cumulative") {
      return {
        url: "/api/v2/chats/new",
        body: { title: "New Chat", models: ["demo"], chat_mode: "normal", timestamp: Date.now() }
      };
    }
    if (SHAPE === "think") {
      return { url: "/api/v1/chats/new", body: { title: "New Chat", models: ["demo"] } };
    }
    return { url: "/api/conversations", body: { title: "New chat" } };
  }

  // A JSON-patch document (patch and batch shapes): ops with `p`/`o`, `{"v": …}` continuing the
  // last path and op, and batches: `o: "patch"`, or a list of ops as the value of an op that
  // has neither `p` nor `o`.
  function PatchDoc() {
    this.root = null;
    this.lastP = null;
    this.lastO = null;
  }

  PatchDoc.prototype.apply = function (op) {
    var self = this;
    var batch = op.o === "patch" || (op.p === undefined && op.o === undefined &&
      Array.isArray(op.v) && op.v.length > 0 && op.v.every(function (x) {
        return x && typeof x === "object" && (x.p !== undefined || x.o !== undefined);
      }));
    if (batch) {
      op.v.forEach(function (sub) { self.apply(sub); });
      return;
    }
    var p = op.p === undefined ? this.lastP : op.p;
    var o = op.o === undefined ? this.lastO : op.o;
    this.lastP = p;
    this.lastO = o;
    if (p === "") {
      if (o === "add" || o === "replace") this.root = op.v;
      return;
    }
    var keys = p.split("/").slice(1);
    var parent = this.root;
    for (var i = 0; i < keys.length - 1 && parent; i++) parent = parent[keys[i]];
    if (!parent) return;
    var key = keys[keys.length - 1];
    if (o === "append") {
      if (Array.isArray(parent[key])) parent[key].push(op.v);
      else parent[key] = (parent[key] || "") + op.v;
    } else if (o === "replace" || o === "add") {
      parent[key] = op.v;
    }
  };

  var SHAPES = {
    openai: {
      request: function (text, files) {
        var messages = history.concat([{ role: "user", content: text }]);
        return {
          url: "/api/openai/v1/chat/completions",
          body: JSON.stringify(attachTo({
            model: "demo",
            messages: messages,
            stream: true,
            conversation_id: conversationId,
            client_request_id: uuid(),
            timestamp: Date.now()
          }, files))
        };
      },
      read: function (response, msg) {
        return readSse(response, function (name, data) {
          if (data === "[DONE]") return;
          var j = JSON.parse(data);
          if (j.error) throw new Error(j.error.message || "error");
          var d = (j.choices && j.choices[0] && j.choices[0].delta) || {};
          if (d.reasoning_content) msg.addReasoning(d.reasoning_content);
          if (d.content) msg.addAnswer(d.content);
        });
      },
      after: function (text, msg) {
        history.push({ role: "user", content: text });
        history.push({ role: "assistant", content: msg.answer });
      }
    },

    patch: {
      request: function (text) {
        return {
          url: "/backend-api/conversation",
          body: JSON.stringify({
            action: "next",
            conversation_id: conversationId,
            parent_message_id: parentMessageId || uuid(),
            messages: [{
              id: uuid(),
              author: { role: "user" },
              create_time: Date.now() / 1000,
              content: { content_type: "text", parts: [text] },
              metadata: {}
            }],
            model: "demo",
            timezone_offset_min: new Date().getTimezoneOffset(),
            history_and_training_disabled: false,
            conversation_mode: { kind: "primary_assistant" },
            client_ts: Date.now()
          })
        };
      },
      read: function (response, msg) {
        var root = null;
        var lastP = null;
        var lastO = null;
        function apply(op) {
          var p = op.p === undefined ? lastP : op.p;
          var o = op.o === undefined ? lastO : op.o;
          if (o === "patch") {
            op.v.forEach(apply);
            return;
          }
          lastP = p;
          lastO = o;
          if (p === "") {
            if (o === "add" || o === "replace") root = op.v;
            return;
          }
          var keys = p.split("/").slice(1);
          var parent = root;
          for (var i = 0; i < keys.length - 1 && parent; i++) parent = parent[keys[i]];
          if (!parent) return;
          var key = keys[keys.length - 1];
          if (o === "append") {
            if (Array.isArray(parent[key])) parent[key].push(op.v);
            else parent[key] = (parent[key] || "") + op.v;
          } else if (o === "replace" || o === "add") {
            parent[key] = op.v;
          }
        }
        return readSse(response, function (name, data) {
          if (data === "[DONE]") return;
          var j = JSON.parse(data);
          if (name === "delta") {
            apply(j);
            var m = root && root.message;
            if (m) {
              parentMessageId = m.id;
              msg.answer = (m.content && m.content.parts && m.content.parts[0]) || "";
              msg.render();
            }
            if (root && root.error) throw new Error(root.error);
          } else if (j && j.type === "title_generation") {
            document.title = j.title + " – Demo Chat";
          } else if (j && j.error) {
            throw new Error(j.error.message || j.error);
          }
        });
      }
    },

    cumulative: {
      request: function (text) {
        return {
          url: "/api/v2/chat/completions?chat_id=" + encodeURIComponent(conversationId),
          body: JSON.stringify({
            stream: true,
            incremental_output: false,
            chat_id: conversationId,
            chat_mode: "normal",
            model: "demo",
            messages: [{ role: "user", content: text, fid: uuid(), chat_type: "t2t" }],
            timestamp: Date.now()
          })
        };
      },
      read: function (response, msg) {
        return readSse(response, function (name, data) {
          var j = JSON.parse(data);
          if (j.error) throw new Error(j.error.message || "error");
          var d = j.choices && j.choices[0] && j.choices[0].delta;
          if (!d || typeof d.content !== "string") return;
          if (d.phase === "think") msg.reasoning = d.content;
          else msg.answer = d.content;
          msg.render();
        });
      }
    },

    ndjson: {
      request: function (text) {
        return {
          url: "/api/stream",
          body: JSON.stringify({
            message: { blocks: [{ type: "text", text: { content: text } }] },
            conversation: { id: conversationId },
            client_msg_id: uuid(),
            sent_at: Date.now()
          })
        };
      },
      read: function (response, msg) {
        return readLines(response, function (line) {
          var j = JSON.parse(line);
          if (j.type === "token") msg.addAnswer(j.data.delta.text);
          else if (j.type === "error") throw new Error(j.message || "error");
        });
      }
    },

    numbered: {
      request: function (text) {
        return {
          url: "/api/trpc/chat.send",
          body: JSON.stringify({
            "0": {
              json: {
                conversationId: conversationId,
                content: [{ type: "text", text: text }],
                messageId: uuid(),
                ts: Date.now()
              }
            }
          })
        };
      },
      read: function (response, msg) {
        return readLines(response, function (line) {
          var i = line.indexOf(":");
          if (i < 0) return;
          var tag = line.slice(0, i);
          var payload = JSON.parse(line.slice(i + 1));
          if (tag === "0" && payload && payload.json) {
            if (payload.json.kind === "reasoning") msg.addReasoning(payload.json.delta);
            else if (payload.json.kind === "text") msg.addAnswer(payload.json.delta);
          } else if (tag === "3") {
            throw new Error((payload && payload.json && payload.json.message) || "error");
          }
        });
      }
    },

    json: {
      request: function (text) {
        var form = new URLSearchParams();
        form.set("prompt", text);
        form.set("conversation", conversationId);
        form.set("nonce", uuid());
        form.set("ts", String(Date.now()));
        return {
          url: "/api/ask",
          body: form.toString(),
          contentType: "application/x-www-form-urlencoded;charset=UTF-8"
        };
      },
      read: async function (response, msg) {
        var j = await response.json();
        if (j.error) throw new Error(j.error.message || "error");
        msg.addAnswer(j.data.answer.text);
      }
    },

    frames: {
      request: function (text) {
        return {
          url: "/api/connect/chat.v1.ChatService/Stream",
          body: JSON.stringify({
            conversationId: conversationId,
            prompt: text,
            requestId: uuid(),
            sentAtMs: Date.now()
          })
        };
      },
      read: function (response, msg) {
        return readFrames(response, function (flag, j) {
          if (flag & 2) {
            if (j && j.error) throw new Error(j.error.message || "error");
            return;
          }
          var r = j.result && j.result.response;
          if (!r || typeof r.token !== "string") return;
          if (r.isThinking) msg.addReasoning(r.token);
          else msg.addAnswer(r.token);
        });
      }
    },

    claude: {
      // The organization (looked up once per page load), then a conversation whose id the
      // server picks.
      prepare: async function () {
        if (!orgId) {
          var r = await fetch("/api/organizations", {
            credentials: "same-origin",
            headers: getHeaders()
          });
          if (!r.ok) throw await failure(r);
          var orgs = await r.json();
          orgId = orgs[0].uuid;
        }
        if (conversationId) return;
        var c = await fetch("/api/organizations/" + encodeURIComponent(orgId) +
          "/chat_conversations", {
          method: "POST",
          credentials: "same-origin",
          headers: apiHeaders(),
          body: JSON.stringify({ uuid: uuid(), name: "" })
        });
        if (!c.ok) throw await failure(c);
        conversationId = (await c.json()).uuid;
      },
      request: function (text) {
        return {
          url: "/api/organizations/" + encodeURIComponent(orgId) + "/chat_conversations/" +
            encodeURIComponent(conversationId) + "/completion",
          body: JSON.stringify({
            prompt: text,
            timezone: "UTC",
            attachments: [],
            files: [],
            rendering_mode: "messages"
          })
        };
      },
      read: function (response, msg) {
        return readSse(response, function (name, data) {
          var j = JSON.parse(data);
          if (name === "error" || j.type === "error") {
            throw new Error((j.error && j.error.message) || "error");
          }
          if (j.type !== "content_block_delta" || !j.delta) return;
          if (j.delta.type === "thinking_delta") msg.addReasoning(j.delta.thinking);
          else if (j.delta.type === "text_delta") msg.addAnswer(j.delta.text);
        });
      }
    },

    ws: {
      exchange: function (text, msg) {
        return wsExchange(text, msg);
      }
    },

    signed: {
      request: function (text, files) {
        var messages = history.concat([{ role: "user", content: text }]);
        return {
          url: "/api/signed/v1/chat/completions",
          body: JSON.stringify(attachTo({
            model: "demo",
            messages: messages,
            stream: true,
            conversation_id: conversationId,
            client_request_id: uuid(),
            timestamp: Date.now()
          }, files))
        };
      },
      read: function (response, msg) {
        return SHAPES.openai.read(response, msg);
      },
      after: function (text, msg) {
        SHAPES.openai.after(text, msg);
      }
    },

    newchat: {
      // The first message goes in the tRPC "new chat" call, answered with ids; the reply
      // streams from /api/chat, which then carries the chat id only. Later messages go in
      // /api/chat itself.
      prepare: function () { return Promise.resolve(); },
      exchange: async function (text, msg) {
        var body;
        if (!conversationId) {
          var r = await fetch("/api/trpc/message.newChat?batch=1", {
            method: "POST",
            credentials: "same-origin",
            headers: apiHeaders(),
            body: JSON.stringify({ "0": { json: { content: text, clientMessageId: uuid(), model: "demo" } } })
          });
          if (!r.ok) throw await failure(r);
          var created = await r.json();
          conversationId = created[0].result.data.json.chatId;
          body = { chatId: conversationId, mode: "start", model: "demo" };
        } else {
          body = { chatId: conversationId, mode: "append", model: "demo", messageInput: text, messageId: uuid() };
        }
        var response = await postChat({ url: "/api/chat", body: JSON.stringify(body) });
        await readLines(response, function (line) {
          var i = line.indexOf(":");
          if (i < 0) return;
          var tag = line.slice(0, i);
          var payload = JSON.parse(line.slice(i + 1));
          if (tag === "0") msg.addAnswer(payload);
          else if (tag === "f") parentMessageId = payload.messageId;
          else if (tag === "3") throw new Error(String(payload));
        });
      }
    },

    batch: {
      // No create call: the first message names no conversation; the reply's first patch
      // names it, and the reply's message id is the parent of the next message.
      prepare: function () { return Promise.resolve(); },
      request: function (text) {
        var body = {
          action: "next",
          messages: [{
            id: uuid(),
            author: { role: "user" },
            content: { content_type: "text", parts: [text] },
            metadata: {}
          }],
          parent_message_id: parentMessageId || "client-created-root",
          model: "demo",
          timezone_offset_min: new Date().getTimezoneOffset(),
          client_ts: Date.now()
        };
        if (conversationId) body.conversation_id = conversationId;
        return { url: "/backend-api/f/conversation", body: JSON.stringify(body) };
      },
      read: function (response, msg) {
        var doc = new PatchDoc();
        return readSse(response, function (name, data) {
          if (data === "[DONE]") return;
          var j = JSON.parse(data);
          if (name === "delta") {
            doc.apply(j);
            var root = doc.root;
            if (root && root.conversation_id) conversationId = root.conversation_id;
            if (root && root.message) {
              parentMessageId = root.message.id;
              msg.answer = (root.message.content && root.message.content.parts[0]) || "";
              msg.render();
            }
          } else if (j && j.error) {
            throw new Error(j.error.message || j.error);
          }
        });
      }
    },

    details: {
      // No create call: the first event names the chat and the reply; a later message sends
      // both back, with a turn counter.
      prepare: function () { return Promise.resolve(); },
      request: function (text) {
        return {
          url: "/api/chat/completions",
          body: JSON.stringify({
            model: "demo",
            stream: true,
            chat_id: conversationId,
            parent_id: parentMessageId,
            turn: turnCount,
            messages: [{ role: "user", content: text }],
            params: {}
          })
        };
      },
      read: function (response, msg) {
        var raw = "";
        return readSse(response, function (name, data) {
          if (data === "[DONE]") return;
          var j = JSON.parse(data);
          if (j.error) throw new Error(j.error.message || "error");
          if (j.chat_id) {
            conversationId = j.chat_id;
            parentMessageId = j.message_id;
            return;
          }
          var d = (j.choices && j.choices[0] && j.choices[0].delta) || {};
          if (typeof d.content !== "string") return;
          raw += d.content;
          var split = splitMarkup(raw);
          msg.reasoning = split.reasoning;
          msg.answer = split.answer;
          msg.render();
        });
      },
      after: function () { turnCount += 1; }
    },

    think: {
      request: function (text) {
        return {
          url: "/api/v1/chats/" + encodeURIComponent(conversationId) + "/completions",
          body: JSON.stringify({
            stream: true,
            model: "demo",
            parent_id: parentMessageId,
            message: { role: "user", content: text, id: uuid(), timestamp: Date.now() }
          })
        };
      },
      read: function (response, msg) {
        return readSse(response, function (name, data) {
          var j = JSON.parse(data);
          if (j.error) throw new Error(j.error.message || "error");
          if (j.response_id) {
            parentMessageId = j.response_id;
            return;
          }
          if (typeof j.text !== "string") return;
          // Every event is the whole marked-up text so far.
          var split = splitMarkup(j.text);
          msg.reasoning = split.reasoning;
          msg.answer = split.answer;
          msg.render();
        });
      }
    },

    fragile: {
      request: function (text) {
        return {
          url: "/api/fragile/chat",
          body: JSON.stringify({
            conversation_id: conversationId,
            message: text,
            request_id: uuid(),
            model: "demo"
          })
        };
      },
      read: function (response, msg) {
        return readSse(response, function (name, data) {
          var j = JSON.parse(data);
          if (name === "token") msg.addAnswer(j.t);
          else if (name === "error") throw new Error(j.message || "error");
        });
      }
    }
  };

  // ---------------------------------------------------------------- the WebSocket (ws shape)

  // Opens the conversation's socket and authenticates: browsers cannot set headers on a
  // WebSocket, so the bearer token travels in the first frame (the cookie goes by itself).
  function openSocket() {
    return new Promise(function (resolve, reject) {
      var scheme = location.protocol === "https:" ? "wss:" : "ws:";
      // No header can go on a WebSocket: the clearance token (if any) goes in the URL.
      var ws = new WebSocket(scheme + "//" + location.host + "/api/ws?conversation=" +
        encodeURIComponent(conversationId) +
        (clearanceToken ? "&clearance=" + encodeURIComponent(clearanceToken) : ""));
      var state = { ws: ws, conversation: conversationId, pending: null };
      ws.onopen = function () {
        ws.send(JSON.stringify({ type: "auth", token: localStorage.getItem(TOKEN_KEY) || "" }));
        resolve(state);
      };
      ws.onmessage = function (event) {
        if (state.pending) state.pending.onFrame(JSON.parse(event.data));
      };
      ws.onclose = function (event) {
        if (socket === state) socket = null;
        var why = "The connection closed (" + event.code + ")";
        if (state.pending) state.pending.fail(new Error(why));
        else reject(new Error(why));
      };
      ws.onerror = function () { /* onclose follows */ };
    });
  }

  async function wsExchange(text, msg) {
    if (!socket || socket.conversation !== conversationId) {
      if (socket) socket.ws.close();
      socket = await openSocket();
    }
    var state = socket;
    return new Promise(function (resolve, reject) {
      state.pending = {
        onFrame: function (j) {
          if (j.type === "token") msg.addAnswer(j.text);
          else if (j.type === "done") {
            state.pending = null;
            resolve();
          } else if (j.type === "error") {
            state.pending = null;
            reject(new Error(j.message || "error"));
          }
        },
        fail: function (e) {
          state.pending = null;
          reject(e);
        }
      };
      state.ws.send(JSON.stringify({
        type: "chat",
        id: uuid(),
        conversation_id: conversationId,
        prompt: text
      }));
    });
  }

  // ---------------------------------------------------------------- attachments

  // Files are uploaded as soon as they are chosen; each entry waits in `pending` until a
  // message is sent: { promise, ref (what the chat call carries, null until done), chip }.
  var pending = [];
  var chipsEl = document.getElementById("attachments");
  var attachInput = document.getElementById("attach");
  var attachButton = document.getElementById("attach-button");

  // Multipart shape: one POST /api/files; the chat call names the answer's id.
  async function uploadMultipart(file) {
    var body = new FormData();
    body.append("purpose", "chat");
    body.append("file", file, file.name);
    var r = await fetch("/api/files", {
      method: "POST",
      credentials: "same-origin",
      headers: authHeaders(),
      body: body
    });
    if (!r.ok) throw await failure(r);
    return (await r.json()).id;
  }

  // Slot shape: a slot, the raw bytes PUT to its URL (no auth header: the URL's token is the
  // authority, as with a presigned URL), then a confirm call that names the file.
  async function uploadSlot(file) {
    var type = file.type || "application/octet-stream";
    var r = await fetch("/api/uploads", {
      method: "POST",
      credentials: "same-origin",
      headers: apiHeaders(),
      body: JSON.stringify({ file_name: file.name, mime_type: type, size: file.size })
    });
    if (!r.ok) throw await failure(r);
    var slot = await r.json();
    var put = await fetch(slot.upload_url, {
      method: "PUT",
      headers: { "content-type": type },
      body: file
    });
    if (!put.ok) throw await failure(put);
    var c = await fetch("/api/uploads/" + encodeURIComponent(slot.upload_id) + "/confirm", {
      method: "POST",
      credentials: "same-origin",
      headers: apiHeaders(),
      body: "{}"
    });
    if (!c.ok) throw await failure(c);
    var done = await c.json();
    return { id: done.file.id, name: file.name, mime_type: type, size: file.size };
  }

  function startUpload(file) {
    var chip = document.createElement("span");
    chip.className = "chip";
    chip.setAttribute("data-status", "uploading");
    chip.textContent = file.name + " …";
    chipsEl.appendChild(chip);
    var entry = { ref: null, chip: chip };
    entry.promise = (async function () {
      await pageReady;
      await ensureClearance();
      return UPLOADS === "slot" ? uploadSlot(file) : uploadMultipart(file);
    })().then(function (ref) {
      entry.ref = ref;
      chip.textContent = file.name + " ✓";
      chip.setAttribute("data-status", "done");
    }, function (e) {
      chip.textContent = file.name + ": " + String((e && e.message) || e);
      chip.classList.add("error");
      chip.setAttribute("data-status", "error");
      chip.setAttribute("role", "alert");
    });
    pending.push(entry);
  }

  // What the next chat call carries: waits for uploads still running, then takes every
  // finished one (failed ones are dropped) and clears the chips.
  async function takeAttachments() {
    var taken = pending;
    pending = [];
    await Promise.all(taken.map(function (entry) { return entry.promise; }));
    taken.forEach(function (entry) { entry.chip.remove(); });
    return taken.filter(function (entry) { return entry.ref !== null; })
      .map(function (entry) { return entry.ref; });
  }

  // The chat body's attachments, in the upload shape's key (none: the key is left out).
  function attachTo(body, files) {
    if (!files || !files.length) return body;
    body[UPLOADS === "slot" ? "attachments" : "files"] = files;
    return body;
  }

  if (UPLOADS && attachInput && attachButton && chipsEl) {
    attachButton.addEventListener("click", function () { attachInput.click(); });
    attachInput.addEventListener("change", function () {
      var files = Array.prototype.slice.call(attachInput.files || []);
      files.forEach(startUpload);
      // So that choosing the same file again is a change too.
      attachInput.value = "";
    });
  }

  // ---------------------------------------------------------------- sending

  async function failure(response) {
    if (response.status === 403 && response.headers.get("cf-mitigated") === "challenge") {
      var blocked = new Error("Blocked by the anti-bot check (403)");
      blocked.challenge = true;
      return blocked;
    }
    var message = "Request failed (" + response.status + ")";
    try {
      var j = await response.json();
      if (j && j.error && j.error.message) message = j.error.message + " (" + response.status + ")";
    } catch (e) { /* not JSON */ }
    if (response.status === 429) {
      var wait = response.headers.get("retry-after");
      if (wait) message += " Retry after " + wait + " s.";
    }
    return new Error(message);
  }

  async function ensureConversation() {
    if (conversationId) return conversationId;
    var pre = createConversationRequest();
    var r = await fetch(pre.url, {
      method: "POST",
      credentials: "same-origin",
      headers: apiHeaders(),
      body: JSON.stringify(pre.body)
    });
    if (!r.ok) throw await failure(r);
    var j = await r.json();
    conversationId = j.data.id;
    return conversationId;
  }

  async function exchange(shape, text, msg, files) {
    await pageReady;
    await ensureClearance();
    await (shape.prepare ? shape.prepare() : ensureConversation());
    if (shape.exchange) {
      await shape.exchange(text, msg);
      return;
    }
    var response = await postChat(shape.request(text, files));
    await shape.read(response, msg);
  }

  // The chat call: signed when the site wants it, refused calls turned into errors.
  async function postChat(req) {
    var headers = apiHeaders(req.contentType);
    if (SIGNED) await signRequest(req, headers);
    var response = await fetch(req.url, {
      method: "POST",
      credentials: "same-origin",
      headers: headers,
      body: req.body
    });
    if (!response.ok) throw await failure(response);
    return response;
  }

  async function send(text) {
    var shape = SHAPES[SHAPE];
    addUserMessage(text);
    var msg = new AssistantMessage();
    try {
      // Uploads still running finish first; the message then carries them.
      var files = await takeAttachments();
      try {
        await exchange(shape, text, msg, files);
      } catch (e) {
        // The anti-bot check came on after this page loaded: get clearance, then try again
        // (the challenge comes before the site does anything with the call).
        if (!(e && e.challenge)) throw e;
        clearanceOn = true;
        await registerClearance();
        await exchange(shape, text, msg, files);
      }
      msg.finish();
      if (shape.after) shape.after(text, msg);
    } catch (e) {
      msg.fail(String((e && e.message) || e));
    }
  }

  // The fragile shape's page takes over its form only once it has been loaded in this tab
  // before: the first time, a click on send submits the form natively and the page reloads
  // (as when a click lands before a site's script is ready).
  var takesOver = true;
  if (SHAPE === "fragile") {
    try {
      takesOver = sessionStorage.getItem("demo_ready") === "1";
      sessionStorage.setItem("demo_ready", "1");
    } catch (e) { /* storage unavailable: behave */ }
  }
  if (!takesOver) return;

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var text = input.value;
    if (!text.trim() || sendButton.disabled) return;
    input.value = "";
    sendButton.disabled = true;
    send(text).finally(function () {
      sendButton.disabled = false;
      input.focus();
    });
  });

  input.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      if (typeof form.requestSubmit === "function") form.requestSubmit();
      else form.dispatchEvent(new Event("submit", { cancelable: true }));
    }
  });

  input.focus();
})();
