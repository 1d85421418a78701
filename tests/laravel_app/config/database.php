<?php

return [
    'redis' => [
        'client' => 'phpredis',
        'options' => [
            // Laravel 8's default: the broadcaster puts it before every channel name.
            'prefix' => env('REDIS_PREFIX', 'laravel_database_'),
        ],
        'default' => [
            'host' => env('REDIS_HOST', '127.0.0.1'),
            'port' => env('REDIS_PORT', '6379'),
            'database' => '0',
        ],
    ],
];
