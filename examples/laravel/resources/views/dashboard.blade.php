{{-- resources/views/dashboard.blade.php — live order updates over SSE.
     Needs /js/sse-client.js (copy examples/js/sse-client.js to public/js/).
     The broker runs in auth.mode = "laravel": the stream request carries the
     session cookie (same host, /events proxied by nginx), so no token. --}}
<!doctype html>
<html lang="en">
<head>
    <meta charset="utf-8">
    <title>Order {{ $order->id }}</title>
    <meta name="csrf-token" content="{{ csrf_token() }}">
</head>
<body>
    <h1>Order {{ $order->id }}: <span id="status">{{ $order->status }}</span></h1>
    <p id="connection">connecting…</p>
    <ul id="log"></ul>

    <script src="/js/sse-client.js"></script>
    <script>
        const orderId = @json($order->id);
        const log = (text) => {
            const li = document.createElement('li');
            li.textContent = text;
            document.getElementById('log').prepend(li);
        };
        // The page's own state, from the app (also what a reset refetches).
        async function refetchOrder() {
            const res = await fetch(`/orders/${orderId}`, {headers: {Accept: 'application/json'}});
            const order = await res.json();
            document.getElementById('status').textContent = order.status;
        }

        const client = SSEClient({
            url: '/events',
            channels: [`private-orders.${orderId}`],   // PrivateChannel('orders.'.$id)
            // Named events to listen to: the class name, or broadcastAs().
            eventTypes: ['App\\Events\\OrderShipped', 'order.status'],
            onEvent(type, data, id) {
                // id: the broker's event id. After a network drop the browser
                // reconnects with Last-Event-ID = the last id and the broker
                // replays what was missed, in order: nothing to do here.
                if (data.status) document.getElementById('status').textContent = data.status;
                log(`${type} ${JSON.stringify(data)} (${id})`);
            },
            onReset(info) {
                // The broker could not replay everything (restarted, too long
                // offline): reload the state. Called after info.refetch_after_ms
                // (jittered, so a thousand dashboards do not hit the app at once).
                log(`reset (${info.reason}): refetching`);
                refetchOrder();
            },
            onState(state) {
                document.getElementById('connection').textContent = state;
            },
        });

        // broadcast(...)->toOthers() must skip this tab: send its socket id on
        // every request to the app (the SSE URL carries it as ?socket_id=).
        window.appFetch = (url, options = {}) => fetch(url, {
            ...options,
            headers: {
                'X-Socket-ID': client.socketId,
                'X-CSRF-TOKEN': document.querySelector('meta[name=csrf-token]').content,
                ...(options.headers || {}),
            },
        });
        // With axios: axios.defaults.headers.common['X-Socket-ID'] = client.socketId;
    </script>
</body>
</html>
