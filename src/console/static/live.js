// The console's live view: server-sent events from /ui/live/events, shown as text only.
"use strict";
(function () {
  var list = document.getElementById("feed");
  var status = document.getElementById("status");
  var MAX = 500;
  function add(text, cls) {
    var item = document.createElement("li");
    item.textContent = text;
    if (cls) { item.className = cls; }
    list.insertBefore(item, list.firstChild);
    while (list.childNodes.length > MAX) { list.removeChild(list.lastChild); }
  }
  var source = new EventSource("/ui/live/events");
  source.onopen = function () { status.textContent = "Connected: new events and settlements appear below."; };
  source.onerror = function () { status.textContent = "Disconnected; reconnecting..."; };
  source.addEventListener("missed", function (e) { add("(" + e.data + " not shown: this view fell behind, or the router is busier than a view can show)", "bad"); });
  source.onmessage = function (e) {
    var h;
    try { h = JSON.parse(e.data); } catch (err) { return; }
    var call = h.call_id === null ? "-" : h.call_id;
    if (h.kind === "stored") {
      add(h.at + "  stored   " + h.event + "  call " + call + "  for " + (h.sinks.length ? h.sinks.join(", ") : "no sink"), "");
    } else {
      add(h.at + "  " + h.outcome + "  " + h.event + "  call " + call + "  -> " + h.sink, h.outcome);
    }
  };
})();
