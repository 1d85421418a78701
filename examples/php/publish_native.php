<?php
/**
 * Publish events in the broker's native format with phpredis (PUBLISH).
 *
 *   php examples/php/publish_native.php [ORDER_ID]
 *
 * Environment (all optional): REDIS_HOST (127.0.0.1), REDIS_PORT (6379),
 * REDIS_PASSWORD, SSE_PREFIX (the broker's ingest.prefix, "sse:"),
 * SSE_TENANT ("acme"), SSE_USERS (comma-separated user ids, "7").
 *
 * Needs php-cli and php-redis (Debian: apt-get install php-cli php-redis).
 */

$host = getenv('REDIS_HOST') ?: '127.0.0.1';
$port = (int) (getenv('REDIS_PORT') ?: 6379);
$prefix = getenv('SSE_PREFIX') !== false ? getenv('SSE_PREFIX') : 'sse:';
$tenant = getenv('SSE_TENANT') ?: 'acme';
$users = array_map('intval', explode(',', getenv('SSE_USERS') ?: '7'));
$orderId = (int) ($argv[1] ?? 42);

$redis = new Redis();
$redis->connect($host, $port, 2.0);
if (getenv('REDIS_PASSWORD')) {
    $redis->auth(getenv('REDIS_PASSWORD'));
}

// 1. A status change every stream of this tenant on channel "orders" sees,
//    kept as the channel's current state under the key "order.<id>": a page
//    that connects later gets the latest value first.
$receivers = $redis->publish($prefix . 'orders', json_encode([
    'event'  => 'order.status',                       // SSE event name (default "message")
    'data'   => ['id' => $orderId, 'status' => 'shipped', 'carrier' => 'DHL/Express'],
    'tenant' => $tenant,                              // only this tenant's streams
    'retain' => "order.$orderId",                     // keep as current state (not with "users")
]));

// 2. A note for some users of that tenant only (ids may be ints: compared as strings).
$redis->publish($prefix . 'orders', json_encode([
    'event'  => 'order.note',
    'data'   => ['id' => $orderId, 'text' => 'Your parcel left the warehouse ✓'],
    'tenant' => $tenant,
    'users'  => $users,
]));

// PUBLISH answers how many subscribers got the message: 0 means no broker
// is subscribed to this Redis (wrong host, port, db or prefix?).
echo "published order $orderId to {$prefix}orders ($receivers subscriber(s))\n";
