<?php

/*
 * laravel/laravel 8.x bootstrap/app.php, except that everything the framework
 * writes (sessions, compiled views, the package and service manifests) goes under
 * LARAVEL_STORAGE_PATH, so the source tree stays read-only.
 */

$storage = getenv('LARAVEL_STORAGE_PATH');
if (! $storage) {
    throw new RuntimeException('set LARAVEL_STORAGE_PATH to a writable directory');
}
foreach (['framework/sessions', 'framework/views', 'bootstrap-cache'] as $dir) {
    is_dir("$storage/$dir") || mkdir("$storage/$dir", 0777, true);
}
foreach (['PACKAGES' => 'packages', 'SERVICES' => 'services'] as $name => $file) {
    putenv("APP_{$name}_CACHE=$storage/bootstrap-cache/$file.php");
}

$app = new Illuminate\Foundation\Application(dirname(__DIR__));
$app->useStoragePath($storage);

$app->singleton(Illuminate\Contracts\Http\Kernel::class, App\Http\Kernel::class);
$app->singleton(
    Illuminate\Contracts\Debug\ExceptionHandler::class,
    Illuminate\Foundation\Exceptions\Handler::class
);

return $app;
