<?php

namespace App\Events;

use Illuminate\Broadcasting\InteractsWithSockets;
use Illuminate\Broadcasting\PrivateChannel;
use Illuminate\Contracts\Broadcasting\ShouldBroadcast;
use Illuminate\Foundation\Events\Dispatchable;
use Illuminate\Queue\SerializesModels;

/**
 * broadcast(new OrderShipped($order->id, 'shipped', $trackingUrl));
 *
 * Reaches browsers subscribed to the SSE channel "private-orders.<id>" as the
 * event "App\Events\OrderShipped" (the class name; see broadcastAs() in
 * OrderStatusUpdated for a short name) with the public properties as data:
 *   {"orderId":42,"status":"shipped","trackingUrl":"https://track.example/42"}
 * An Eloquent model in a public property is sent as its toArray().
 *
 * ShouldBroadcast goes through your queue (run a worker); implement
 * ShouldBroadcastNow instead to publish during the request.
 */
class OrderShipped implements ShouldBroadcast
{
    use Dispatchable, InteractsWithSockets, SerializesModels;

    public function __construct(
        public int $orderId,
        public string $status = 'shipped',
        public ?string $trackingUrl = null,
    ) {
    }

    /**
     * @return array<int, \Illuminate\Broadcasting\Channel>
     */
    public function broadcastOn(): array
    {
        return [new PrivateChannel('orders.'.$this->orderId)];
    }
}
