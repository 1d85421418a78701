<?php

use Illuminate\Support\Facades\Broadcast;

// private-orders.{id}: only the order's owner (order N belongs to user N).
Broadcast::channel('orders.{id}', fn ($user, $id) => (int) $user->id === (int) $id);

// presence-room.{id}: everyone, with member info. The Redis broadcaster answers
// {"channel_data": {"user_id": <id>, "user_info": <this array>}}.
Broadcast::channel('room.{id}', fn ($user, $id) => ['id' => $user->id, 'name' => $user->name]);

// presence-lobby: a presence callback that returns true instead of member info.
// The Redis broadcaster then answers plain `true`, without channel_data.
Broadcast::channel('lobby', fn ($user) => true);
