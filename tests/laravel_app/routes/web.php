<?php

use App\Events\NewsPosted;
use App\Events\OrderShipped;
use App\Events\RoomMessage;
use Illuminate\Support\Facades\Auth;
use Illuminate\Support\Facades\Route;

// Loaded with the `web` middleware group (session, encrypted cookies, CSRF).

Route::get('/', fn () => response()->json(['app' => 'laravel', 'version' => app()->version()]));

// Log in as user {id} (no password: a test app). The response carries the
// session cookie and the XSRF-TOKEN cookie, like any page of a Laravel app.
Route::get('/login/{id}', function (string $id) {
    abort_unless(Auth::loginUsingId($id), 404);

    return response()->json(['user' => Auth::id()]);
});

// broadcast(new ...) as an app's controllers do; ShouldBroadcastNow: no queue.
Route::get('/orders/{id}/ship', function (int $id) {
    broadcast(new OrderShipped($id, 'shipped'));

    return response()->json(['broadcast' => "private-orders.$id"]);
});
Route::get('/presence/{room}/say/{text}', function (string $room, string $text) {
    broadcast(new RoomMessage($room, $text));

    return response()->json(['broadcast' => "presence-$room"]);
});
Route::get('/news/{text}', function (string $text) {
    broadcast(new NewsPosted($text));

    return response()->json(['broadcast' => 'news']);
});

// Hostile answers to the broker's POST (what a wrong auth.laravel.url, a proxy or
// a hand-written auth route may answer with a 2xx). They are behind VerifyCsrfToken
// like everything here: they answer only when the broker forwarded the token.
Route::post('/hostile/no-content', fn () => response()->noContent());
Route::post('/hostile/false', fn () => response()->json(false));
Route::post('/hostile/empty-object', fn () => response()->json(new stdClass()));
Route::post('/hostile/auth-not-a-string', fn () => response()->json(['auth' => 5]));
Route::post('/hostile/empty-user-id', fn () => response()->json([
    'channel_data' => ['user_id' => '', 'user_info' => ['name' => 'nobody']],
]));

// A single-page app's catch-all: any method, any path, 200 with the HTML shell.
Route::any('/{any}', fn () => response(
    '<!doctype html><html><head><title>Shop</title></head><body><div id="app"></div></body></html>'
))->where('any', '.*');
