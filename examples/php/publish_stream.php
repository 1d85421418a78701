<?php
/**
 * Publish events in stream mode (the broker's ingest.mode = "stream") with phpredis:
 *
 *   XADD <stream key> MINID ~ <now - ttl> * channel C event E data D [tenant T] [users U] [retain K]
 *
 *   php examples/php/publish_stream.php [ORDER_ID]
 *
 * Environment (all optional): REDIS_HOST (127.0.0.1), REDIS_PORT (6379),
 * REDIS_PASSWORD, SSE_STREAM_KEY (ingest.stream_key, "sse:stream"),
 * SSE_TTL_SECONDS (history kept in the stream; match replay.ttl_seconds, 300),
 * SSE_TENANT ("acme"), SSE_USERS (comma-separated user ids, "7").
 *
 * Prints the stream ids: they are the event ids browsers see, on every broker.
 */

$host = getenv('REDIS_HOST') ?: '127.0.0.1';
$port = (int) (getenv('REDIS_PORT') ?: 6379);
$streamKey = getenv('SSE_STREAM_KEY') ?: 'sse:stream';
$ttlSeconds = (int) (getenv('SSE_TTL_SECONDS') ?: 300);
$tenant = getenv('SSE_TENANT') ?: 'acme';
$users = array_map('intval', explode(',', getenv('SSE_USERS') ?: '7'));
$orderId = (int) ($argv[1] ?? 42);

$redis = new Redis();
$redis->connect($host, $port, 2.0);
if (getenv('REDIS_PASSWORD')) {
    $redis->auth(getenv('REDIS_PASSWORD'));
}

/**
 * Append one event. Every field value is a string: data is sent to browsers
 * verbatim (so json_encode it), users is a JSON array, retain a key.
 * MINID ~ trims entries older than the TTL as we add (the broker only reads).
 */
function sse_xadd(Redis $redis, string $key, int $ttlSeconds, array $fields): string
{
    $minId = (string) ((int) (microtime(true) * 1000) - $ttlSeconds * 1000);
    $args = ['XADD', $key, 'MINID', '~', $minId, '*'];
    foreach ($fields as $name => $value) {
        $args[] = $name;
        $args[] = (string) $value;
    }
    $id = $redis->rawCommand(...$args);
    if (!is_string($id)) {
        throw new RuntimeException('XADD failed: ' . ($redis->getLastError() ?? 'no answer'));
    }
    return $id;
}

$ids = [];
$ids[] = sse_xadd($redis, $streamKey, $ttlSeconds, [
    'channel' => 'orders',
    'event'   => 'order.status',
    'data'    => json_encode(['id' => $orderId, 'status' => 'shipped']),
    'tenant'  => $tenant,
    'retain'  => "order.$orderId",
]);
$ids[] = sse_xadd($redis, $streamKey, $ttlSeconds, [
    'channel' => 'orders',
    'event'   => 'order.note',
    'data'    => json_encode(['id' => $orderId, 'text' => 'Your parcel left the warehouse ✓']),
    'tenant'  => $tenant,
    'users'   => json_encode($users),
]);

echo implode("\n", $ids), "\n";
