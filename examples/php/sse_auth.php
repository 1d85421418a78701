<?php
/**
 * The broker's auth.mode = "callback" endpoint in plain PHP, with PHP's own sessions.
 *
 * The broker calls GET <auth.callback.url>?channel=A&channel=B with the browser's
 * Cookie (and Authorization) plus X-SSE-Broker-Key; this answers who the browser
 * is and which channel patterns it may subscribe:
 *
 *   200 {"user": "7", "tenant": "acme", "channels": ["orders.acme.*", "user.7"], "ttl": 60}
 *   401 not logged in          403 not the broker calling
 *
 * The broker itself checks the requested channels against "channels" (and
 * auth.grants), so this endpoint need not look at ?channel= at all. (If you do:
 * PHP's $_GET keeps only the LAST of repeated "channel=" parameters; parse
 * $_SERVER['QUERY_STRING'] yourself.)
 *
 * Try it with PHP's built-in server:
 *   SSE_BROKER_KEY=s3cret php -S 127.0.0.1:8001 examples/php/sse_auth.php
 * and in the broker: auth.mode = "callback", auth.callback.url =
 * "http://127.0.0.1:8001/sse/auth", auth.callback.key = "s3cret",
 * auth.callback.credential_cookies = ["PHPSESSID"] (session_name()).
 *
 * Your login code stores the user in the session: $_SESSION['user_id'], $_SESSION['tenant'].
 */

header('Content-Type: application/json');
header('Cache-Control: no-store');

function answer(int $status, array $body): void
{
    http_response_code($status);
    echo json_encode($body, JSON_UNESCAPED_SLASHES), "\n";
}

$path = parse_url($_SERVER['REQUEST_URI'] ?? '/', PHP_URL_PATH);
if ($path !== '/sse/auth' || ($_SERVER['REQUEST_METHOD'] ?? 'GET') !== 'GET') {
    answer(404, ['error' => 'not_found']);
    return;
}

// Only the broker may ask (the key travels on the loopback/private network).
$expected = (string) getenv('SSE_BROKER_KEY');
$given = (string) ($_SERVER['HTTP_X_SSE_BROKER_KEY'] ?? '');
if ($expected === '' || !hash_equals($expected, $given)) {
    answer(403, ['error' => 'not_the_broker']);
    return;
}

// read_and_close: do not hold the session lock while the browser's other
// requests wait (a reconnect storm would queue behind it).
if (isset($_COOKIE[session_name()])) {
    session_start(['read_and_close' => true]);
}
$userId = $_SESSION['user_id'] ?? null;
if ($userId === null) {
    answer(401, ['error' => 'unauthenticated']);
    return;
}
$user = (string) $userId;
$tenant = (string) ($_SESSION['tenant'] ?? '');

answer(200, [
    'user'     => $user,
    'tenant'   => $tenant !== '' ? $tenant : null,
    // Glob patterns this browser may subscribe; add auth.grants such as
    // "user.{user}" in the broker config for what every user gets.
    'channels' => array_values(array_filter([
        $tenant !== '' ? "orders.$tenant.*" : null,
        "user.$user",
    ])),
    'ttl'      => 60,  // seconds the broker may cache this (capped at cache_ttl_seconds)
]);
