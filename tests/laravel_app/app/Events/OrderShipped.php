<?php

namespace App\Events;

use Illuminate\Broadcasting\InteractsWithSockets;
use Illuminate\Broadcasting\PrivateChannel;
use Illuminate\Contracts\Broadcasting\ShouldBroadcastNow;
use Illuminate\Foundation\Events\Dispatchable;

/** No broadcastAs(): the SSE event name is the class name. */
class OrderShipped implements ShouldBroadcastNow
{
    use Dispatchable, InteractsWithSockets;

    public function __construct(public int $orderId, public string $status)
    {
    }

    public function broadcastOn()
    {
        return new PrivateChannel("orders.{$this->orderId}");
    }
}
