<?php
/**
 * The same two events as publish_native.php / publish_stream.php, with predis.
 *
 *   php examples/php/publish_predis.php native [ORDER_ID]    # PUBLISH (ingest.mode = "pubsub")
 *   php examples/php/publish_predis.php stream [ORDER_ID]    # XADD    (ingest.mode = "stream")
 *
 * Environment: as publish_native.php and publish_stream.php.
 * predis comes from Composer (vendor/autoload.php, `composer require predis/predis`)
 * or from Debian's php-predis package (/usr/share/php/Predis/autoload.php).
 */

$composer = getenv('COMPOSER_AUTOLOAD') ?: __DIR__ . '/vendor/autoload.php';
if (is_file($composer)) {
    require $composer;
} else {
    require 'Predis/autoload.php';  // Debian's php-predis, on the default include_path
}

$mode = $argv[1] ?? 'native';
$orderId = (int) ($argv[2] ?? 42);
$tenant = getenv('SSE_TENANT') ?: 'acme';
$users = array_map('intval', explode(',', getenv('SSE_USERS') ?: '7'));

$params = [
    'scheme' => 'tcp',
    'host'   => getenv('REDIS_HOST') ?: '127.0.0.1',
    'port'   => (int) (getenv('REDIS_PORT') ?: 6379),
];
if (getenv('REDIS_PASSWORD')) {
    $params['password'] = getenv('REDIS_PASSWORD');
}
$client = new Predis\Client($params);

if ($mode === 'native') {
    $prefix = getenv('SSE_PREFIX') !== false ? getenv('SSE_PREFIX') : 'sse:';
    $receivers = $client->publish($prefix . 'orders', json_encode([
        'event'  => 'order.status',
        'data'   => ['id' => $orderId, 'status' => 'shipped'],
        'tenant' => $tenant,
        'retain' => "order.$orderId",
    ]));
    $client->publish($prefix . 'orders', json_encode([
        'event'  => 'order.note',
        'data'   => ['id' => $orderId, 'text' => 'Your parcel left the warehouse ✓'],
        'tenant' => $tenant,
        'users'  => $users,
    ]));
    echo "published order $orderId to {$prefix}orders ($receivers subscriber(s))\n";
} elseif ($mode === 'stream') {
    $key = getenv('SSE_STREAM_KEY') ?: 'sse:stream';
    $ttlSeconds = (int) (getenv('SSE_TTL_SECONDS') ?: 300);
    $minId = (string) ((int) (microtime(true) * 1000) - $ttlSeconds * 1000);
    // executeRaw: works on predis 1.x and 2.x alike (MINID needs Redis >= 6.2).
    $ids = [];
    $ids[] = $client->executeRaw(['XADD', $key, 'MINID', '~', $minId, '*',
        'channel', 'orders',
        'event', 'order.status',
        'data', json_encode(['id' => $orderId, 'status' => 'shipped']),
        'tenant', $tenant,
        'retain', "order.$orderId"]);
    $ids[] = $client->executeRaw(['XADD', $key, 'MINID', '~', $minId, '*',
        'channel', 'orders',
        'event', 'order.note',
        'data', json_encode(['id' => $orderId, 'text' => 'Your parcel left the warehouse ✓']),
        'tenant', $tenant,
        'users', json_encode($users)]);
    foreach ($ids as $id) {
        if (!is_string($id) || !preg_match('/^\d+-\d+$/', $id)) {
            fwrite(STDERR, 'XADD failed: ' . var_export($id, true) . "\n");
            exit(1);
        }
    }
    echo implode("\n", $ids), "\n";
} else {
    fwrite(STDERR, "usage: php publish_predis.php native|stream [ORDER_ID]\n");
    exit(2);
}
