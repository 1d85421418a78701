<?php

// routes/web.php — only needed for the broker's auth.mode = "callback" or "jwt".
// With auth.mode = "laravel" (recommended for Laravel apps) the existing
// Broadcast::routes() / routes/channels.php are all the broker needs.

use Illuminate\Http\Request;
use Illuminate\Support\Facades\Route;

// auth.mode = "callback": the broker calls GET /sse/auth?channel=A&channel=B
// with the browser's cookies and X-SSE-Broker-Key. In routes/web.php, so the
// session middleware runs and $request->user() is the browser's user.
//   200 {"user", "tenant", "channels": [glob patterns], "ttl"}   401 / 403 deny
// The broker checks the requested channels against "channels" itself. (To
// read them here: $request->query('channel') keeps only the last of repeated
// parameters; parse $request->server('QUERY_STRING') instead.)
Route::get('/sse/auth', function (Request $request) {
    $key = (string) config('services.sse.key');
    abort_unless($key !== '' && hash_equals($key, (string) $request->header('X-SSE-Broker-Key')), 403);

    $user = $request->user();
    if (! $user) {
        return response()->json(['error' => 'unauthenticated'], 401);
    }

    return response()->json([
        'user' => (string) $user->id,
        'tenant' => (string) $user->team_id,
        'channels' => ["orders.{$user->team_id}.*", "user.{$user->id}"],
        'ttl' => 60,
    ]);
})->name('sse.auth');

// auth.mode = "jwt": the page fetches a short-lived token for the stream.
// Same claims as examples/php/mint_jwt.php (plain PHP, HS256, no Composer).
Route::get('/sse/token', function (Request $request) {
    $user = $request->user();
    abort_unless($user, 401);
    // sse_jwt(): copy it from examples/php/mint_jwt.php, e.g. into app/helpers.php
    // (autoloaded through composer.json "autoload": {"files": ["app/helpers.php"]}).

    return response(sse_jwt([
        'sub' => (string) $user->id,
        'tenant' => (string) $user->team_id,
        'channels' => ["orders.{$user->team_id}.*"],
        'exp' => time() + 900,
    ], (string) config('services.sse.jwt_secret')), 200, ['Content-Type' => 'text/plain']);
})->middleware('auth');
