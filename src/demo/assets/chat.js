// Demo Chat front end: vanilla JS, no build step.
// On send: create a conversation (first message of the page), then call the chat endpoint of
// the site's wire shape and render the streamed reply as it arrives.
(function () {
  "use strict";

  var SHAPE = meta("demo-shape") || "openai";
  var TOKEN_KEY = "demo_token";

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
  var parentMessageId = null; // patch shape: id of the last assistant message

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

  function apiHeaders(contentType) {
    return {
      "content-type": contentType || "application/json",
      "authorization": "Bearer " + (localStorage.getItem(TOKEN_KEY) || ""),
      "x-csrf-token": meta("csrf-token") || ""
    };
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
    this.answerEl.innerHTML = renderMarkdown(this.answer);
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

  // ---------------------------------------------------------------- the shapes

  function createConversationRequest() {
    if (SHAPE === "cumulative") {
      return {
        url: "/api/v2/chats/new",
        body: { title: "New Chat", models: ["demo"], chat_mode: "normal", timestamp: Date.now() }
      };
    }
    return { url: "/api/conversations", body: { title: "New chat" } };
  }

  var SHAPES = {
    openai: {
      request: function (text) {
        var messages = history.concat([{ role: "user", content: text }]);
        return {
          url: "/api/openai/v1/chat/completions",
          body: JSON.stringify({
            model: "demo",
            messages: messages,
            stream: true,
            conversation_id: conversationId,
            client_request_id: uuid(),
            timestamp: Date.now()
          })
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
    }
  };

  // ---------------------------------------------------------------- sending

  async function failure(response) {
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

  async function send(text) {
    var shape = SHAPES[SHAPE];
    addUserMessage(text);
    var msg = new AssistantMessage();
    try {
      await ensureConversation();
      var req = shape.request(text);
      var response = await fetch(req.url, {
        method: "POST",
        credentials: "same-origin",
        headers: apiHeaders(req.contentType),
        body: req.body
      });
      if (!response.ok) throw await failure(response);
      await shape.read(response, msg);
      msg.finish();
      if (shape.after) shape.after(text, msg);
    } catch (e) {
      msg.fail(String((e && e.message) || e));
    }
  }

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
