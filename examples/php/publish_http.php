<?php
/**
 * Publish through the broker's HTTP API (POST /publish on the admin listener),
 * for hosts that cannot reach Redis. Plain PHP: a stream context, no extension.
 *
 *   SSE_PUBLISH_KEY=... php examples/php/publish_http.php [ORDER_ID]
 *
 * Environment: SSE_ADMIN_URL (the broker's admin listener, http://127.0.0.1:9464),
 * SSE_PUBLISH_KEY (one of publish.keys or a line of publish.keys_file; required),
 * SSE_TENANT ("acme").
 *
 * Prints the broker's answer, {"published": n, "ids": [...]} (ids in stream mode).
 * Exits 1 on any other answer than 200.
 */

$adminUrl = rtrim(getenv('SSE_ADMIN_URL') ?: 'http://127.0.0.1:9464', '/');
$key = getenv('SSE_PUBLISH_KEY');
if ($key === false || $key === '') {
    fwrite(STDERR, "SSE_PUBLISH_KEY is required\n");
    exit(2);
}
$orderId = (int) ($argv[1] ?? 42);
$tenant = getenv('SSE_TENANT') ?: 'acme';

// One envelope with a "channel" field, or a list of up to 1000 (all or nothing).
$events = [
    [
        'channel' => 'orders',
        'event'   => 'order.status',
        'data'    => ['id' => $orderId, 'status' => 'shipped'],
        'tenant'  => $tenant,
    ],
    [
        'channel' => 'orders',
        'event'   => 'order.note',
        'data'    => ['id' => $orderId, 'text' => 'Your parcel left the warehouse ✓'],
        'tenant'  => $tenant,
    ],
];

$context = stream_context_create(['http' => [
    'method'        => 'POST',
    'header'        => "Authorization: Bearer $key\r\nContent-Type: application/json\r\n",
    'content'       => json_encode($events),
    'timeout'       => 5,
    'ignore_errors' => true,  // read the JSON error body of a 4xx/5xx too
]]);
$body = @file_get_contents("$adminUrl/publish", false, $context);
if ($body === false) {
    fwrite(STDERR, "cannot reach $adminUrl/publish\n");
    exit(1);
}
// $http_response_header is set by file_get_contents: "HTTP/1.1 200 OK" first.
preg_match('#^HTTP/\S+ (\d{3})#', $http_response_header[0] ?? '', $m);
$status = (int) ($m[1] ?? 0);
echo $body, "\n";
exit($status === 200 ? 0 : 1);
