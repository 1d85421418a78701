<?php
/**
 * Publish exactly what Laravel's Redis broadcaster publishes, without a Laravel app.
 *
 * For trying the broker (and for this repository's tests) with real PHP and
 * phpredis: this file mirrors, step by step, what `broadcast(new Event(...))`
 * does with BROADCAST_CONNECTION=redis —
 *
 *   Illuminate\Broadcasting\BroadcastEvent::handle()
 *     name     = $event->broadcastAs() if defined, else get_class($event)
 *     channels = Arr::wrap($event->broadcastOn()), each cast to string
 *                (PrivateChannel('orders.1') is "private-orders.1")
 *     payload  = $event->broadcastWith() + ['socket' => $event->socket] if defined,
 *                else every public property (Arrayable values as toArray())
 *   Illuminate\Broadcasting\Broadcasters\RedisBroadcaster::broadcast()
 *     $socket  = Arr::pull($payload, 'socket');
 *     json_encode(['event' => $name, 'data' => $payload, 'socket' => $socket])
 *                (no flags: "/" is written "\/" and non-ASCII "\uXXXX")
 *     EVAL "for i = 2, #ARGV do redis.call('publish', ARGV[i], ARGV[1]) end" 0
 *          <json> <prefix><channel>...   (prefix = config('database.redis.options.prefix'))
 *
 * Usage:
 *   php tools/broadcast.php [options] CLASS [ARG...]
 *       new App\Events\CLASS(ARG...) from ../app/Events/CLASS.php; each ARG is
 *       JSON when it parses (42, "x", null, [1]), else a string
 *   php tools/broadcast.php [options] --raw CHANNEL EVENT PAYLOAD_JSON
 *       like Laravel's Broadcast::on(CHANNEL)->as(EVENT)->with(PAYLOAD)->sendNow()
 *       (CHANNEL as published, e.g. private-orders.1; PAYLOAD a JSON object or [])
 * Options:
 *   --socket=ID       the X-Socket-ID of the request that broadcast it, as with
 *                     ->toOthers() (the broker skips streams opened with ?socket_id=ID)
 *   --socket-in-data  the payload shape of Laravel versions that also left
 *                     "socket" inside "data" ('data' => $payload, 'socket' =>
 *                     Arr::pull($payload, 'socket') evaluated in that order)
 * Environment: REDIS_HOST (127.0.0.1), REDIS_PORT (6379), REDIS_PASSWORD,
 *   REDIS_PREFIX (Laravel's Redis prefix, default "laravel_database_").
 *
 * Prints the JSON message once per channel as "<redis channel> <json>".
 */

namespace Illuminate\Contracts\Support {
    if (!\interface_exists(Arrayable::class)) {
        interface Arrayable
        {
            public function toArray();
        }
    }
}

namespace Illuminate\Contracts\Broadcasting {
    if (!\interface_exists(ShouldBroadcast::class)) {
        interface ShouldBroadcast
        {
            public function broadcastOn();
        }
    }
    if (!\interface_exists(ShouldBroadcastNow::class)) {
        interface ShouldBroadcastNow extends ShouldBroadcast
        {
        }
    }
}

namespace Illuminate\Broadcasting {
    if (!\class_exists(Channel::class)) {
        class Channel
        {
            public function __construct(public string $name)
            {
            }

            public function __toString(): string
            {
                return $this->name;
            }
        }
    }
    if (!\class_exists(PrivateChannel::class)) {
        class PrivateChannel extends Channel
        {
            public function __construct(string $name)
            {
                parent::__construct('private-'.$name);
            }
        }
    }
    if (!\class_exists(PresenceChannel::class)) {
        class PresenceChannel extends Channel
        {
            public function __construct(string $name)
            {
                parent::__construct('presence-'.$name);
            }
        }
    }
    if (!\trait_exists(InteractsWithSockets::class)) {
        trait InteractsWithSockets
        {
            /** Set by ->toOthers() from the request's X-Socket-ID header. */
            public $socket;

            public function dontBroadcastToCurrentUser()
            {
                $this->socket = $GLOBALS['__broadcast_socket'] ?? null;  // Broadcast::socket()

                return $this;
            }

            public function broadcastToEveryone()
            {
                $this->socket = null;

                return $this;
            }
        }
    }
}

namespace Illuminate\Foundation\Events {
    if (!\trait_exists(Dispatchable::class)) {
        trait Dispatchable
        {
        }
    }
}

namespace Illuminate\Queue {
    if (!\trait_exists(SerializesModels::class)) {
        trait SerializesModels
        {
        }
    }
}

namespace {
    use Illuminate\Contracts\Support\Arrayable;

    /** BroadcastEvent::handle(): the event name. */
    function laravel_event_name(object $event): string
    {
        return method_exists($event, 'broadcastAs') ? $event->broadcastAs() : get_class($event);
    }

    /** BroadcastEvent::handle() + Broadcaster::formatChannels(): channel names. */
    function laravel_channels(object $event): array
    {
        $channels = $event->broadcastOn();
        $channels = is_array($channels) ? $channels : [$channels];  // Arr::wrap

        return array_map(fn ($channel) => (string) $channel, $channels);
    }

    /** BroadcastEvent::getPayloadFromEvent(). */
    function laravel_payload(object $event): array
    {
        if (method_exists($event, 'broadcastWith') && !is_null($payload = $event->broadcastWith())) {
            return array_merge($payload, ['socket' => $event->socket ?? null]);
        }
        $payload = [];
        foreach ((new ReflectionClass($event))->getProperties(ReflectionProperty::IS_PUBLIC) as $property) {
            $value = $property->getValue($event);
            $payload[$property->getName()] = $value instanceof Arrayable ? $value->toArray() : $value;
        }
        unset($payload['broadcastQueue']);

        return $payload;
    }

    /** RedisBroadcaster::broadcast(): returns the JSON message it published. */
    function laravel_redis_broadcast(
        Redis $redis,
        string $prefix,
        array $channels,
        string $event,
        array $payload,
        bool $socketInData = false,
    ): string {
        if ($socketInData) {
            $message = json_encode([
                'event' => $event,
                'data' => $payload,
                'socket' => Illuminate_Arr_pull($payload, 'socket'),
            ]);
        } else {
            $socket = Illuminate_Arr_pull($payload, 'socket');
            $message = json_encode(['event' => $event, 'data' => $payload, 'socket' => $socket]);
        }
        if ($message === false) {
            throw new RuntimeException('json_encode failed: '.json_last_error_msg());
        }
        $script = <<<'LUA'
            for i = 2, #ARGV do
              redis.call('publish', ARGV[i], ARGV[1])
            end
        LUA;
        $args = [$message];
        foreach ($channels as $channel) {
            $args[] = $prefix.$channel;  // RedisBroadcaster::formatChannels()
        }
        $result = $redis->eval($script, $args, 0);
        if ($result === false && $redis->getLastError() !== null) {
            throw new RuntimeException('EVAL failed: '.$redis->getLastError());
        }

        return $message;
    }

    /** Illuminate\Support\Arr::pull() for a plain array. */
    function Illuminate_Arr_pull(array &$array, string $key)
    {
        $value = $array[$key] ?? null;
        unset($array[$key]);

        return $value;
    }

    function cli_value(string $arg)
    {
        $decoded = json_decode($arg, true);

        return json_last_error() === JSON_ERROR_NONE ? $decoded : $arg;
    }

    if (PHP_SAPI === 'cli' && realpath($_SERVER['SCRIPT_FILENAME'] ?? '') === __FILE__) {
        $socket = null;
        $socketInData = false;
        $raw = false;
        $positional = [];
        foreach (array_slice($argv, 1) as $arg) {
            if (str_starts_with($arg, '--socket=')) {
                $socket = substr($arg, strlen('--socket='));
            } elseif ($arg === '--socket-in-data') {
                $socketInData = true;
            } elseif ($arg === '--raw') {
                $raw = true;
            } else {
                $positional[] = $arg;
            }
        }
        if ($raw) {
            if (count($positional) !== 3) {
                fwrite(STDERR, "usage: broadcast.php [--socket=ID] --raw CHANNEL EVENT PAYLOAD_JSON\n");
                exit(2);
            }
            [$channel, $name, $json] = $positional;
            $with = json_decode($json, true);
            if (!is_array($with)) {
                fwrite(STDERR, "PAYLOAD_JSON must be a JSON object or array\n");
                exit(2);
            }
            $channels = [$channel];
            // AnonymousEvent: broadcastWith() is the payload, plus the socket.
            $payload = array_merge($with, ['socket' => $socket]);
        } else {
            if (!$positional) {
                fwrite(STDERR, "usage: broadcast.php [--socket=ID] [--socket-in-data] CLASS [ARG...]\n");
                exit(2);
            }
            $class = array_shift($positional);
            $file = __DIR__.'/../app/Events/'.basename($class).'.php';
            if (!is_file($file)) {
                fwrite(STDERR, "no event class file $file\n");
                exit(2);
            }
            require_once $file;
            $fqcn = 'App\\Events\\'.basename($class);
            $event = new $fqcn(...array_map('cli_value', $positional));
            if ($socket !== null) {
                $GLOBALS['__broadcast_socket'] = $socket;  // the request's X-Socket-ID
                $event->dontBroadcastToCurrentUser();      // what ->toOthers() does
            }
            $name = laravel_event_name($event);
            $channels = laravel_channels($event);
            $payload = laravel_payload($event);
        }

        $prefix = getenv('REDIS_PREFIX') !== false ? getenv('REDIS_PREFIX') : 'laravel_database_';
        $redis = new Redis();
        $redis->connect(getenv('REDIS_HOST') ?: '127.0.0.1', (int) (getenv('REDIS_PORT') ?: 6379), 2.0);
        if (getenv('REDIS_PASSWORD')) {
            $redis->auth(getenv('REDIS_PASSWORD'));
        }
        $message = laravel_redis_broadcast($redis, $prefix, $channels, $name, $payload, $socketInData);
        foreach ($channels as $channel) {
            echo $prefix.$channel, ' ', $message, "\n";
        }
    }
}
