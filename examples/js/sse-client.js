/*! sse-client.js — a small browser client for sse-broker. No build step, no dependencies.
 *
 *   <script src="/js/sse-client.js"></script>
 *   <script>
 *     const client = SSEClient({
 *       url: "/events",                        // the broker's stream endpoint (may be another origin)
 *       channels: ["orders.42", "status"],     // all over ONE EventSource connection
 *       eventTypes: ["order.shipped"],         // named events to listen to, besides "message"
 *       onEvent(type, data, id) { ... },       // data: parsed JSON when it parses, else the string
 *       onReset({reason, refetch_after_ms}) { refetchFromYourApi(); },  // events were missed
 *       onState(state) { ... },                // "connecting" | "open" | "reconnecting" | "closed"
 *       getToken: async () => (await fetch("/sse-token")).text(),        // optional (JWT mode)
 *       withCredentials: true,                 // send cookies to a broker on another origin
 *     });
 *     fetch("/orders", {headers: {"X-Socket-ID": client.socketId}});   // Laravel toOthers()
 *     client.close();
 *   </script>
 *
 * What it does on top of EventSource (see examples/js/README.md):
 * - remembers the id of the last event seen (MessageEvent.lastEventId);
 * - broker.reset: calls onReset after the jittered refetch_after_ms the broker asked for;
 * - broker.reconnect "token_expired" (with getToken): closes the stream before the browser
 *   retries with the dead token, asks getToken() for a fresh one and reopens with
 *   ?token=<new>&last_event_id=<last id> (a NEW EventSource sends no Last-Event-ID header);
 * - any other broker.reconnect reason: the browser reconnects by itself, with Last-Event-ID;
 * - when the browser gave up for good (readyState CLOSED: a 401, a 502 from a proxy while
 *   the broker restarts, a CORS refusal): reopens with exponential backoff (capped,
 *   jittered) and ?last_event_id=;
 * - sends ?socket_id= (client.socketId) so that Laravel's broadcast(...)->toOthers() skips
 *   the tab whose request caused the event.
 */
(function (root, factory) {
  "use strict";
  if (typeof module === "object" && module && module.exports) {
    module.exports = factory();
  } else {
    root.SSEClient = factory();
  }
})(typeof self !== "undefined" ? self : this, function () {
  "use strict";

  var CONTROL_RESET = "broker.reset";
  var CONTROL_RECONNECT = "broker.reconnect";

  function randomInt(max) {
    var c = typeof crypto !== "undefined" && crypto.getRandomValues ? crypto : null;
    if (c) {
      var buf = new Uint32Array(1);
      c.getRandomValues(buf);
      return buf[0] % max;
    }
    return Math.floor(Math.random() * max);
  }

  // Pusher/Laravel style "<int>.<int>" (Laravel validates socket ids as \d+\.\d+).
  function newSocketId() {
    return String(1 + randomInt(999999999)) + "." + String(1 + randomInt(999999999));
  }

  function parseData(raw, json) {
    if (!json) return raw;
    try {
      return JSON.parse(raw);
    } catch (e) {
      return raw; // plain-text payloads (redis-cli PUBLISH sse:news hello)
    }
  }

  function report(where, err) {
    if (typeof console !== "undefined" && console.error) {
      console.error("sse-client: " + where + " threw", err);
    }
  }

  function SSEClient(options) {
    if (!(this instanceof SSEClient)) return new SSEClient(options);
    var opts = options || {};
    if (!opts.channels || !opts.channels.length) {
      throw new Error("SSEClient: at least one channel is required");
    }
    var backoff = opts.backoff || {};
    this.url = opts.url || "/events";
    this.channels = opts.channels.slice();
    this.eventTypes = (opts.eventTypes || []).slice();
    this.socketId = opts.socketId || newSocketId();
    this.withCredentials = !!opts.withCredentials;
    this.tokenParam = opts.tokenParam || "token";
    this.json = opts.json !== false;
    this.params = opts.params || {};
    this.backoffInitialMs = backoff.initialMs != null ? backoff.initialMs : 1000;
    this.backoffMaxMs = backoff.maxMs != null ? backoff.maxMs : 30000;
    this.onEvent = opts.onEvent || function () {};
    this.onReset = opts.onReset || function () {};
    this.onReconnect = opts.onReconnect || function () {};
    this.onState = opts.onState || function () {};
    this.getToken = opts.getToken || null;

    this.lastEventId = opts.lastEventId || null; // id of the last event seen, "" never
    this.state = null;
    this.token = null;
    this.currentUrl = null; // URL of the current EventSource
    this.attempts = 0; // reopen attempts since the last successful open
    this.source = null;
    this._timer = null; // pending reopen
    this._resetTimer = null; // pending onReset
    this._closed = false;
    this._setState("connecting");
    this._open(false);
  }

  SSEClient.prototype._setState = function (state) {
    if (state === this.state) return;
    this.state = state;
    try {
      this.onState(state);
    } catch (e) {
      report("onState", e);
    }
  };

  SSEClient.prototype._buildUrl = function (resume) {
    var base = typeof location !== "undefined" ? location.href : undefined;
    var u = new URL(this.url, base);
    var q = u.searchParams;
    for (var i = 0; i < this.channels.length; i++) q.append("channel", this.channels[i]);
    if (this.socketId) q.set("socket_id", this.socketId);
    if (this.token) q.set(this.tokenParam, this.token);
    // Only a NEW EventSource needs it: on its own reconnects the browser sends the
    // Last-Event-ID header, which the broker prefers over this (then stale) parameter.
    if (resume && this.lastEventId) q.set("last_event_id", this.lastEventId);
    for (var key in this.params) {
      if (Object.prototype.hasOwnProperty.call(this.params, key)) q.set(key, this.params[key]);
    }
    return u.toString();
  };

  // Ask the page for a (fresh) token when it gave getToken, then open a new EventSource.
  SSEClient.prototype._open = function (resume) {
    var self = this;
    if (this._closed) return;
    if (!this.getToken) {
      this._connect(resume);
      return;
    }
    var pending;
    try {
      pending = Promise.resolve(this.getToken());
    } catch (e) {
      pending = Promise.reject(e);
    }
    pending.then(
      function (token) {
        if (self._closed) return;
        self.token = token || null;
        self._connect(resume);
      },
      function (err) {
        report("getToken", err);
        self._scheduleReopen();
      }
    );
  };

  SSEClient.prototype._connect = function (resume) {
    var self = this;
    if (this._closed) return;
    this.currentUrl = this._buildUrl(resume);
    var es = new EventSource(this.currentUrl, { withCredentials: this.withCredentials });
    this.source = es;

    es.onopen = function () {
      if (es !== self.source) return;
      self.attempts = 0;
      self._setState("open");
    };
    es.onerror = function () {
      if (es !== self.source) return;
      if (es.readyState === EventSource.CLOSED) {
        // The browser gave up for good (non-200 status, wrong content type, CORS).
        self.source = null;
        self._scheduleReopen();
      } else {
        self._setState("reconnecting"); // the browser retries by itself
      }
    };

    var onData = function (e) {
      if (es !== self.source) return;
      if (e.lastEventId) self.lastEventId = e.lastEventId;
      try {
        self.onEvent(e.type, parseData(e.data, self.json), e.lastEventId || null);
      } catch (err) {
        report("onEvent", err);
      }
    };
    es.addEventListener("message", onData);
    for (var i = 0; i < this.eventTypes.length; i++) {
      if (this.eventTypes[i] !== "message") es.addEventListener(this.eventTypes[i], onData);
    }

    es.addEventListener(CONTROL_RESET, function (e) {
      if (es !== self.source) return;
      if (e.lastEventId) self.lastEventId = e.lastEventId;
      var info = parseData(e.data, true) || {};
      self._scheduleReset(info);
    });

    es.addEventListener(CONTROL_RECONNECT, function (e) {
      if (es !== self.source) return;
      if (e.lastEventId) self.lastEventId = e.lastEventId;
      var info = parseData(e.data, true) || {};
      try {
        self.onReconnect(info);
      } catch (err) {
        report("onReconnect", err);
      }
      if (info.reason === "token_expired" && self.getToken) {
        // Close now, before the browser retries with the expired token; reopen with a
        // fresh token from where we are (the frame's id is the broker's head).
        es.close();
        self.source = null;
        self._setState("reconnecting");
        self._open(true);
      }
      // Any other reason: the broker ends the stream and the browser reconnects by
      // itself after retry_ms, sending Last-Event-ID.
    });
  };

  SSEClient.prototype._scheduleReset = function (info) {
    var self = this;
    var delay = Number(info.refetch_after_ms);
    if (!(delay >= 0)) delay = 0;
    // Several resets before the refetch ran: one refetch, after the latest delay.
    if (this._resetTimer !== null) clearTimeout(this._resetTimer);
    this._resetTimer = setTimeout(function () {
      self._resetTimer = null;
      if (self._closed) return;
      try {
        self.onReset({ reason: info.reason, refetch_after_ms: info.refetch_after_ms });
      } catch (err) {
        report("onReset", err);
      }
    }, delay);
  };

  // Exponential backoff with a cap and jitter: a random delay in [base/2, base].
  SSEClient.prototype.nextDelay = function () {
    var base = Math.min(this.backoffMaxMs, this.backoffInitialMs * Math.pow(2, this.attempts));
    this.attempts += 1;
    return Math.round(base / 2 + Math.random() * (base / 2));
  };

  SSEClient.prototype._scheduleReopen = function () {
    var self = this;
    if (this._closed) return;
    this._setState("reconnecting");
    if (this._timer !== null) clearTimeout(this._timer);
    this._timer = setTimeout(function () {
      self._timer = null;
      self._open(true);
    }, this.nextDelay());
  };

  SSEClient.prototype.close = function () {
    this._closed = true;
    if (this._timer !== null) clearTimeout(this._timer);
    if (this._resetTimer !== null) clearTimeout(this._resetTimer);
    this._timer = this._resetTimer = null;
    if (this.source) this.source.close();
    this.source = null;
    this._setState("closed");
  };

  SSEClient.version = "1.0.0";
  return SSEClient;
});
