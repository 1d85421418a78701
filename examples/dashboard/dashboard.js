/* The live dashboard: one SSEClient (one EventSource) for every channel.
 *
 * Query string (all optional):
 *   broker=http://127.0.0.1:8080   the broker's base URL (default: this page's origin)
 *   path=/events                   the broker's stream path
 *   channels=orders,metrics,log    channels to subscribe (comma-separated)
 *   token=<jwt>                    a token for auth.mode = "jwt" (dev only: use getToken in apps)
 *   credentials=0                  do not send cookies to a broker on another origin
 *
 * An SSE frame carries no channel name: the event names (order.created, metric, log, ...)
 * say what an event is, which is why publishers set "event".
 */
(function () {
  "use strict";

  var params = new URLSearchParams(location.search);
  var brokerBase = (params.get("broker") || "").replace(/\/+$/, "");
  var path = params.get("path") || "/events";
  var channels = (params.get("channels") || "orders,metrics,log")
    .split(",")
    .map(function (c) { return c.trim(); })
    .filter(Boolean);
  var token = params.get("token");
  var withCredentials = params.get("credentials") !== "0";

  var MAX_ORDERS = 12;
  var MAX_LOG = 40;
  var STATE_TEXT = {
    connecting: "connecting…",
    open: "connected",
    reconnecting: "reconnecting…",
    closed: "closed",
  };

  var $ = function (id) { return document.getElementById(id); };
  var stats = { events: 0, orders: 0, resets: 0, reconnects: 0, byType: {} };

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text != null) node.textContent = String(text);
    return node;
  }

  function clock(date) {
    return (date || new Date()).toTimeString().slice(0, 8);
  }

  function money(value, currency) {
    try {
      return new Intl.NumberFormat("en", { style: "currency", currency: currency || "EUR" })
        .format(value);
    } catch (e) {
      return String(value) + " " + (currency || "");
    }
  }

  // -- activity log ----------------------------------------------------------------

  function logLine(level, message) {
    var li = el("li");
    li.appendChild(el("span", "at mono", clock()));
    li.appendChild(el("span", "lvl " + level, level));
    li.appendChild(el("span", "msg", message));
    var list = $("log");
    list.insertBefore(li, list.firstChild);
    while (list.children.length > MAX_LOG) list.removeChild(list.lastChild);
  }

  // -- metrics tiles -----------------------------------------------------------------

  function renderMetric(m) {
    if (!m || !m.name) return;
    $("tiles-empty").hidden = true;
    var id = "tile-" + m.name.replace(/[^A-Za-z0-9_-]/g, "_");
    var tile = $(id);
    if (!tile) {
      tile = el("div", "tile");
      tile.id = id;
      tile.appendChild(el("div", "label", m.label || m.name));
      var value = el("div", "value");
      value.appendChild(el("span", "v"));
      value.appendChild(el("span", "unit"));
      tile.appendChild(value);
      tile.appendChild(el("div", "trend"));
      $("tiles").appendChild(tile);
    }
    var v = typeof m.value === "number" ? m.value.toLocaleString("en") : String(m.value);
    tile.querySelector(".v").textContent = v;
    tile.querySelector(".unit").textContent = m.unit || "";
    var trend = tile.querySelector(".trend");
    var delta = Number(m.delta || 0);
    trend.className = "trend " + (delta > 0 ? "up" : delta < 0 ? "down" : "");
    trend.textContent = delta
      ? (delta > 0 ? "▲ " : "▼ ") + Math.abs(delta).toLocaleString("en") + " since last"
      : "steady";
    tile.classList.add("flash");
    setTimeout(function () { tile.classList.remove("flash"); }, 400);
  }

  // -- orders --------------------------------------------------------------------------

  function orderRow(order) {
    var id = "order-" + order.id;
    var row = $(id);
    if (!row) {
      row = el("tr", "new");
      row.id = id;
      for (var i = 0; i < 6; i++) row.appendChild(el("td"));
      row.children[2].className = "num";
      row.children[3].className = "num";
      var body = $("orders");
      body.insertBefore(row, body.firstChild);
      while (body.children.length > MAX_ORDERS) body.removeChild(body.lastChild);
      setTimeout(function () { row.classList.remove("new"); }, 1500);
      $("orders-empty").hidden = true;
    }
    return row;
  }

  function renderOrder(type, order) {
    if (!order || order.id == null) return;
    var row = orderRow(order);
    var cells = row.children;
    cells[0].textContent = "#" + order.id;
    if (order.customer) cells[1].textContent = order.customer;
    if (order.items != null) cells[2].textContent = order.items;
    if (order.total != null) cells[3].textContent = money(order.total, order.currency);
    var status = order.status || type.split(".")[1] || "created";
    cells[4].textContent = "";
    cells[4].appendChild(el("span", "status-badge " + status, status));
    cells[5].textContent = clock();
    if (type === "order.created") {
      stats.orders += 1;
      $("orders-count").textContent = stats.orders;
    }
  }

  // -- connection ------------------------------------------------------------------------

  function showBanner(text, kind) {
    var banner = $("banner");
    banner.className = "banner" + (kind ? " " + kind : "");
    banner.textContent = text;
    banner.hidden = false;
  }

  function onState(state) {
    var pill = $("state");
    pill.dataset.state = state;
    pill.textContent = STATE_TEXT[state] || state;
    if (state === "open" && !$("banner").dataset.sticky) $("banner").hidden = true;
  }

  function onEvent(type, data, id) {
    stats.events += 1;
    stats.byType[type] = (stats.byType[type] || 0) + 1;
    $("event-count").textContent = stats.events;
    $("last-id").textContent = id || "–";
    if (type === "metric") {
      renderMetric(data);
    } else if (type.indexOf("order.") === 0) {
      renderOrder(type, data);
      var verb = type === "order.created" ? "new order" : type.replace("order.", "order ");
      logLine("info", verb + " #" + data.id + (data.customer ? " · " + data.customer : ""));
    } else if (type === "log") {
      logLine(data.level || "info", data.message || JSON.stringify(data));
    } else {
      logLine("info", type + ": " + (typeof data === "string" ? data : JSON.stringify(data)));
    }
  }

  // broker.reset: events were missed (outage, broker restart, history expired). The client
  // calls this after the jittered refetch_after_ms. A real app refetches its state from its
  // own API here (fetch("/api/orders")...); the demo clears the feed it can no longer trust.
  // Metric tiles need nothing: they are retained state, which the broker sends after a reset.
  function onReset(info) {
    stats.resets += 1;
    var body = $("orders");
    body.textContent = "";
    var note = el("tr", "note");
    var cell = el("td", null, "feed cleared after a reset (" + info.reason + "): refetch from your API here");
    cell.colSpan = 6;
    note.appendChild(cell);
    body.appendChild(note);
    showBanner(
      "Some live events were missed (" + info.reason + "); state refetched at " + clock() + "."
    );
    $("banner").dataset.sticky = "1";
    logLine("broker", "reset: " + info.reason + ", refetched after " + info.refetch_after_ms + " ms");
  }

  // broker.reconnect: the broker ends this stream on purpose (deploy, recycle, token expiry).
  function onReconnect(info) {
    stats.reconnects += 1;
    delete $("banner").dataset.sticky;
    showBanner("The broker asked us to reconnect (" + info.reason + "); reconnecting…", "info");
    logLine("broker", "reconnect: " + info.reason + ", retry in " + info.retry_ms + " ms");
  }

  var url = (brokerBase || location.origin) + path;
  $("broker-url").textContent = url;
  $("channels").textContent = channels.join(", ");

  var client = SSEClient({
    url: url,
    channels: channels,
    eventTypes: ["order.created", "order.paid", "order.shipped", "order.cancelled", "metric", "log"],
    withCredentials: withCredentials,
    params: token ? { token: token } : {},
    onEvent: onEvent,
    onReset: onReset,
    onReconnect: onReconnect,
    onState: onState,
  });
  $("socket-id").textContent = client.socketId;
  window.addEventListener("pagehide", function () { client.close(); });

  window.dashboard = { client: client, stats: stats };
})();
