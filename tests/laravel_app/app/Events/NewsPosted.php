<?php

namespace App\Events;

use Illuminate\Broadcasting\Channel;
use Illuminate\Contracts\Broadcasting\ShouldBroadcastNow;
use Illuminate\Foundation\Events\Dispatchable;

/** On the public channel `news` (the tests' fence: sent last, awaited). */
class NewsPosted implements ShouldBroadcastNow
{
    use Dispatchable;

    public function __construct(public string $text)
    {
    }

    public function broadcastOn()
    {
        return new Channel('news');
    }

    public function broadcastAs()
    {
        return 'news';
    }
}
