<?php

namespace App\Events;

use Illuminate\Broadcasting\InteractsWithSockets;
use Illuminate\Broadcasting\PrivateChannel;
use Illuminate\Contracts\Broadcasting\ShouldBroadcastNow;
use Illuminate\Foundation\Events\Dispatchable;

/**
 * broadcast(new OrderStatusUpdated($order->id, 'packed', 'Größe L/XL'))->toOthers();
 *
 * Published at once (ShouldBroadcastNow, no queue) as the SSE event
 * "order.status" (broadcastAs) with exactly broadcastWith() as data.
 * ->toOthers() skips the browser tab whose request caused it: that tab sends
 * its socket id as X-Socket-ID on its requests to the app and as
 * ?socket_id= on its /events URL (see resources/views/dashboard.blade.php).
 */
class OrderStatusUpdated implements ShouldBroadcastNow
{
    use Dispatchable, InteractsWithSockets;

    public function __construct(
        public int $orderId,
        public string $status,
        public string $note = '',
    ) {
    }

    /**
     * @return array<int, \Illuminate\Broadcasting\Channel>
     */
    public function broadcastOn(): array
    {
        return [new PrivateChannel('orders.'.$this->orderId)];
    }

    /** The SSE event name: es.addEventListener('order.status', ...). */
    public function broadcastAs(): string
    {
        return 'order.status';
    }

    /** @return array<string, mixed> the event's data */
    public function broadcastWith(): array
    {
        return ['id' => $this->orderId, 'status' => $this->status, 'note' => $this->note];
    }
}
