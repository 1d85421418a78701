<?php

return [
    'default' => 'stderr',  // php -S's own output, which the tests keep in a log file
    'channels' => [
        'stderr' => [
            'driver' => 'monolog',
            'handler' => Monolog\Handler\StreamHandler::class,
            'with' => ['stream' => 'php://stderr'],
        ],
    ],
];
