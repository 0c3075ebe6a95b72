// tandem console: refreshes the overview's live figures every second from
// /live.json. Everything else works without script.
"use strict";
(function () {
  if (!document.getElementById("live")) {
    return;
  }
  var ids = { commits_per_s: "commits-per-s", p50: "p50", p99: "p99", in_flight: "in-flight", note: "live-note" };
  function show(figures) {
    Object.keys(ids).forEach(function (key) {
      var element = document.getElementById(ids[key]);
      if (element && typeof figures[key] === "string") {
        element.textContent = figures[key];
      }
    });
  }
  function poll() {
    fetch("/live.json", { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.json();
      })
      .then(show)
      .catch(function (error) {
        show({ note: "the console does not answer (" + error.message + ")" });
      });
  }
  window.setInterval(poll, 1000);
})();
