<?php

/*
 * Front controller of a small but real Laravel 8.83 application, run by the tests
 * under PHP's built-in server without composer (Debian's php-laravel-framework):
 *
 *   LARAVEL_STORAGE_PATH=/tmp/x APP_KEY=base64:... REDIS_HOST=127.0.0.1 REDIS_PORT=6379 \
 *     php -S 127.0.0.1:8000 -t tests/laravel_app/public tests/laravel_app/public/index.php
 *
 * It is the stock request path of public/index.php in laravel/laravel 8.x; only
 * the autoloaders differ: Debian's (on the default include_path /usr/share/php)
 * instead of vendor/autoload.php, and a PSR-4 loader for App\ instead of composer's.
 */

define('LARAVEL_START', microtime(true));

require 'Illuminate/autoload.php';

spl_autoload_register(function (string $class): void {
    if (str_starts_with($class, 'App\\')) {
        $file = __DIR__.'/../app/'.str_replace('\\', '/', substr($class, 4)).'.php';
        if (is_file($file)) {
            require $file;
        }
    }
});

$app = require __DIR__.'/../bootstrap/app.php';

$kernel = $app->make(Illuminate\Contracts\Http\Kernel::class);

$response = $kernel->handle(
    $request = Illuminate\Http\Request::capture()
)->send();

$kernel->terminate($request, $response);
