// Captcha challenge: draws the circles and posts a click (box coordinates) to the server.
// On success the server sets the session cookie and answers the bearer token, which is stored
// like the login page stores it; then the page goes to the chat.
(function () {
  "use strict";

  var data = JSON.parse(document.getElementById("challenge-data").textContent);
  var canvas = document.querySelector(".captcha-widget canvas");
  var statusEl = document.getElementById("challenge-status");
  var ctx = canvas.getContext("2d");
  var busy = false;

  function draw() {
    var w = canvas.width;
    var h = canvas.height;
    ctx.fillStyle = "#f9fafb";
    ctx.fillRect(0, 0, w, h);
    ctx.strokeStyle = "#eaecf0";
    ctx.lineWidth = 1;
    for (var x = 25; x < w; x += 25) {
      ctx.beginPath(); ctx.moveTo(x + 0.5, 0); ctx.lineTo(x + 0.5, h); ctx.stroke();
    }
    for (var y = 25; y < h; y += 25) {
      ctx.beginPath(); ctx.moveTo(0, y + 0.5); ctx.lineTo(w, y + 0.5); ctx.stroke();
    }
    data.shapes.forEach(function (s) {
      ctx.beginPath();
      ctx.arc(s.x, s.y, s.r, 0, 2 * Math.PI);
      ctx.fillStyle = s.color;
      ctx.fill();
    });
    ctx.strokeStyle = "#c8ccd1";
    ctx.strokeRect(0.5, 0.5, w - 1, h - 1);
  }

  function show(message) {
    statusEl.textContent = message;
    statusEl.hidden = false;
  }

  canvas.addEventListener("click", function (event) {
    if (busy) return;
    var rect = canvas.getBoundingClientRect();
    var x = event.clientX - rect.left;
    var y = event.clientY - rect.top;
    busy = true;
    fetch("/login/challenge", {
      method: "POST",
      credentials: "same-origin",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ id: data.id, x: x, y: y })
    }).then(function (response) {
      return response.json().then(function (body) {
        return { ok: response.ok, body: body };
      });
    }).then(function (result) {
      if (result.ok && result.body.token) {
        try { localStorage.setItem(data.token_key, result.body.token); } catch (e) {}
        statusEl.hidden = true;
        location.replace(result.body.redirect || "/chat");
        return;
      }
      busy = false;
      var error = result.body && result.body.error;
      show((error && error.message) || "Try again");
    }).catch(function () {
      busy = false;
      show("Something went wrong. Try again");
    });
  });

  draw();
})();
