<?php

namespace App\Providers;

use App\Auth\StubUserProvider;
use Illuminate\Support\Facades\Auth;
use Illuminate\Support\Facades\Broadcast;
use Illuminate\Support\Facades\Route;
use Illuminate\Support\ServiceProvider;

/** What AuthServiceProvider, BroadcastServiceProvider and RouteServiceProvider of a stock app do. */
class AppServiceProvider extends ServiceProvider
{
    public function boot()
    {
        Auth::provider('stub', fn () => new StubUserProvider());

        // BroadcastServiceProvider: Laravel's own /broadcasting/auth (BroadcastController)
        Broadcast::routes();
        require base_path('routes/channels.php');

        // RouteServiceProvider
        Route::middleware('web')->group(base_path('routes/web.php'));
    }
}
