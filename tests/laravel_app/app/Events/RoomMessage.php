<?php

namespace App\Events;

use Illuminate\Broadcasting\InteractsWithSockets;
use Illuminate\Broadcasting\PresenceChannel;
use Illuminate\Contracts\Broadcasting\ShouldBroadcastNow;
use Illuminate\Foundation\Events\Dispatchable;

/** A chat line in a presence channel (`room.1`, `lobby`); event name `room.message`. */
class RoomMessage implements ShouldBroadcastNow
{
    use Dispatchable, InteractsWithSockets;

    public function __construct(public string $room, public string $text)
    {
    }

    public function broadcastOn()
    {
        return new PresenceChannel($this->room);
    }

    public function broadcastAs()
    {
        return 'room.message';
    }

    public function broadcastWith()
    {
        return ['text' => $this->text];
    }
}
