<?php

// routes/channels.php — Laravel's own channel authorization. With the broker's
// auth.mode = "laravel" these callbacks decide who may open which SSE channel:
// the broker POSTs channel_name + socket_id to /broadcasting/auth with the
// browser's cookies, exactly like Laravel Echo does. Nothing SSE-specific here.

use App\Models\Order;
use App\Models\User;
use Illuminate\Support\Facades\Broadcast;

// SSE channel "private-orders.42": the order's owner only.
Broadcast::channel('orders.{orderId}', function (User $user, int $orderId) {
    return $user->id === Order::findOrNew($orderId)->user_id;
});

// SSE channel "presence-chat.7": return the user's info to allow. Laravel
// answers {"channel_data": {"user_id": <id>, "user_info": {...}}} and the
// broker makes that user_id the stream's user, so events published with
// "users" (native format) reach only those users' streams.
Broadcast::channel('chat.{roomId}', function (User $user, int $roomId) {
    if ($user->rooms()->whereKey($roomId)->exists()) {
        return ['id' => $user->id, 'name' => $user->name];
    }

    return false;
});

// Laravel's notification channel (broadcast notifications):
// SSE channel "private-App.Models.User.7", event
// "Illuminate\Notifications\Events\BroadcastNotificationCreated".
Broadcast::channel('App.Models.User.{id}', function (User $user, int $id) {
    return (int) $user->id === $id;
});
