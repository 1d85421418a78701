<?php

// config/broadcasting.php — the parts that matter for sse-broker.
// (Laravel 11+: `php artisan install:broadcasting` creates this file and
// routes/channels.php; answer "no" to installing Reverb.)

return [

    // BROADCAST_CONNECTION=redis in .env (BROADCAST_DRIVER before Laravel 11).
    'default' => env('BROADCAST_CONNECTION', 'null'),

    'connections' => [

        // Laravel's Redis broadcaster: PUBLISH <redis prefix><channel>
        // {"event": ..., "data": ..., "socket": ...}. The broker reads exactly
        // this with ingest.format = "laravel" and ingest.prefix = the prefix
        // below (config('database.redis.options.prefix')).
        'redis' => [
            'driver' => 'redis',
            // A connection name from config/database.php 'redis' (its host and
            // port are the broker's redis.url).
            'connection' => 'default',
        ],

        'log' => ['driver' => 'log'],
        'null' => ['driver' => 'null'],
    ],

];

// config/services.php — secrets for routes/web.php (only the mode you use):
//
//     'sse' => [
//         'key' => env('SSE_BROKER_KEY'),          // auth.mode = "callback"
//         'jwt_secret' => env('SSE_JWT_SECRET'),   // auth.mode = "jwt"
//     ],
